"""An ended chain's state is kept for `ended_chain_ttl_s`, then the server removes it; a running
chain's state never expires. On a real nats-server: two router replicas, two tenants reusing one
chain id, and the bucket of an older version getting per-message TTLs on start."""

from __future__ import annotations

from pathlib import Path

import msgspec
import nats
import pytest
from helpers import running, wait_until
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainState,
    Config,
    ConfigError,
    WaitStep,
    load_config,
)
from chainyard.router.engine import Router
from chainyard.router.store import Conflict, StateStore
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer


def held(chain_id: str) -> Chain:
    """A chain that waits for signal `go`: running until the test sends it."""
    return Chain(id=chain_id, steps=[WaitStep(id="hold", signal="go")])


async def stored(bus: Bus, tenant: str, chain_id: str) -> tuple[bytes, dict[str, str]] | None:
    """The chain's state message as the bucket's stream holds it (None: no such key)."""
    bucket = bus.topology.chains_kv.bucket
    try:
        msg = await bus.js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{tenant}.{chain_id}")
    except NotFoundError:
        return None
    return msg.data or b"", dict(msg.headers or {})


async def finish(client: Client, chain_id: str) -> ChainCompleted:
    await client.submit(held(chain_id))
    await client.signal(chain_id, "go")
    end = await client.run(held(chain_id), timeout=15)
    assert isinstance(end, ChainCompleted), end
    return end


class QuickExpiry(Router):
    """A router whose ended chains expire after a second, so that a test can watch the server
    remove them: a config refuses a TTL below the streams' duplicate window (10 minutes)."""

    async def ended_chain_ttl(self) -> int:
        return 1


async def test_ended_chains_expire_and_running_ones_stay(bus: Bus, nats_server: NatsServer) -> None:
    other = await open_bus(nats_server.url, name="second-router")
    try:
        async with running(QuickExpiry(bus, Config()), QuickExpiry(other, Config())):
            clients = {t: Client(bus.nc, t, bus.topology) for t in ("acme", "beta")}
            # acme's "waiting" runs from before the others end to after their states are gone
            await clients["acme"].submit(held("waiting"))
            await wait_until(lambda: stored(bus, "acme", "waiting"), 15, "acme.waiting's state")
            for client in clients.values():
                await finish(client, "same")
            for tenant in clients:
                kept = await stored(bus, tenant, "same")
                assert kept is not None and kept[1].get("Nats-TTL") == "1", (tenant, kept)
            running_state = await stored(bus, "acme", "waiting")
            assert running_state is not None and "Nats-TTL" not in running_state[1]

            async def both_gone() -> bool:
                return all([await stored(bus, t, "same") is None for t in clients])

            await wait_until(both_gone, 15, "both ended states to expire")
            # older than the TTL by now, and still there: running states carry none
            assert await stored(bus, "acme", "waiting") == running_state
            # the id is free again: the router creates its state anew (a run this soon would
            # have its messages taken for repeats: what the config's minimum rules out)
            await clients["acme"].submit(held("same"))
            again = await wait_until(lambda: stored(bus, "acme", "same"), 15, "a new acme.same")
            assert b'"running"' in again[0] and "Nats-TTL" not in again[1]
            assert await stored(bus, "beta", "same") is None  # beta's id untouched by acme's
            await clients["acme"].signal("waiting", "go")
            end = await clients["acme"].run(held("waiting"), timeout=15)
            assert isinstance(end, ChainCompleted), end
    finally:
        await other.close()


async def test_the_router_takes_its_ttl_from_the_config(bus: Bus) -> None:
    assert await Router(bus, Config(ended_chain_ttl_s=0)).ended_chain_ttl() == 0
    assert await Router(bus, Config()).ended_chain_ttl() == 7 * 24 * 3600


async def test_the_write_that_ends_a_chain_carries_the_ttl_and_stays_a_compare_and_set(
    bus: Bus,
) -> None:
    store = StateStore(bus.chains, bus.js, bus.topology.chains_kv)
    store.ended_ttl_s = 60
    state = ChainState(chain=held("c"), tenant="acme", created_at_ms=1)
    key = store.key("acme", "c")
    rev = await store.create(key, state)
    assert "Nats-TTL" not in (await stored(bus, "acme", "c") or (b"", {}))[1]
    ended = msgspec.structs.replace(state, status="completed", ended_at_ms=2)
    with pytest.raises(Conflict):
        await store.update(key, ended, rev + 1)  # another writer's revision: refused
    await store.update(key, ended, rev)
    kept = await stored(bus, "acme", "c")
    assert kept is not None and kept[1].get("Nats-TTL") == "60"
    store.ended_ttl_s = 0  # kept until deleted
    await store.create(store.key("beta", "c"), ended)
    kept = await stored(bus, "beta", "c")
    assert kept is not None and "Nats-TTL" not in kept[1]


async def test_an_older_chains_bucket_gets_per_message_ttls(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    bucket = Config().topology.chains_kv.bucket
    # the bucket's stream as an older nats-py made it: no per-message TTLs
    await js.add_stream(
        StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            max_msgs_per_subject=1,
            storage=StorageType.FILE,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
        )
    )
    await (await js.key_value(bucket)).put("acme.kept", b"{}")
    assert not (await js.stream_info(f"KV_{bucket}")).config.allow_msg_ttl
    bus = await open_bus(nats_server.url, name="test-upgrade")
    try:
        assert (await js.stream_info(f"KV_{bucket}")).config.allow_msg_ttl
        assert (await bus.chains.get("acme.kept")).value == b"{}"
    finally:
        await bus.close()
        await nc.close()


def test_the_ttl_is_whole_seconds_zero_or_past_the_duplicate_window(tmp_path: Path) -> None:
    """Below the streams' duplicate window an id would run again with its assignments and end
    dropped as repeats of the earlier run's (the same message ids): refused."""
    cfg = tmp_path / "chainyard.toml"
    for bad, why in (("-1", "ended_chain_ttl_s"), ("60", "at least 600 s"), ("599", "600 s")):
        cfg.write_text(f"ended_chain_ttl_s = {bad}\n")
        with pytest.raises(ConfigError, match=why):
            load_config(cfg)
    for good in (0, 600, 86400):
        cfg.write_text(f"ended_chain_ttl_s = {good}\n")
        assert load_config(cfg).ended_chain_ttl_s == good
