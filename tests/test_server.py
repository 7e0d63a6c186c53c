"""The embedded nats-server: free port, JetStream, separate instances, clean stop."""

from __future__ import annotations

import asyncio

import nats
import pytest
from helpers import alive
from nats.js.api import StreamConfig

from chainyard.runtime.server import NatsServer, ServerError


async def test_starts_on_a_free_port_with_jetstream(nats_server: NatsServer) -> None:
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert nats_server.port > 0 and nats_server.url.endswith(f":{nats_server.port}")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
        ack = await js.publish("t.x", b"hello")
        assert ack.stream == "T" and ack.seq == 1
        msg = await js.get_msg("T", 1)
        assert msg.data == b"hello"
    finally:
        await nc.close()


async def test_two_servers_get_different_ports_and_stores() -> None:
    async with NatsServer() as a, NatsServer() as b:
        assert a.port != b.port
        assert a.store_dir != b.store_dir
        # each one is its own JetStream: a stream in one is not in the other
        nca, ncb = await nats.connect(a.url), await nats.connect(b.url)
        try:
            await nca.jetstream().add_stream(StreamConfig(name="ONLY_A", subjects=["a.>"]))
            names = [s.config.name for s in await ncb.jetstream().streams_info()]
            assert "ONLY_A" not in names
        finally:
            await nca.close()
            await ncb.close()


async def test_stop_removes_store_and_process() -> None:
    server = await NatsServer().start()
    pid, store = server.pid, server.store_dir
    assert pid is not None and alive(pid)
    assert store.is_dir()
    await server.stop()
    assert not store.exists()
    assert not alive(pid), f"nats-server pid {pid} still running after stop()"
    assert server.pid is None


async def test_context_manager_stops_on_error() -> None:
    pid = None
    with pytest.raises(RuntimeError, match="inside"):
        async with NatsServer() as s:
            pid = s.pid
            raise RuntimeError("inside")
    assert pid is not None and not alive(pid)


async def test_restart_keeps_port_and_streams() -> None:
    async with NatsServer() as s:
        nc = await nats.connect(s.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        try:
            await nc.jetstream().add_stream(StreamConfig(name="KEEP", subjects=["k.>"]))
            await nc.jetstream().publish("k.1", b"x")
            port, old_pid = s.port, s.pid
            await s.restart()
            assert s.port == port and s.pid != old_pid
            info = await asyncio.wait_for(nc.jetstream().stream_info("KEEP"), 10)
            assert info.state.messages == 1
        finally:
            await nc.close()


async def test_bad_config_reports_server_error(tmp_path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("this is { not valid")
    with pytest.raises(ServerError):
        await NatsServer(config_file=bad, ready_timeout_s=5).start()
