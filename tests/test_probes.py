"""/healthz and /readyz on the service port of real `chainyard router` / `worker` processes.

Not ready before NATS is up, ready once connected with consumers bound (and, for an LLM worker,
its provider reachable or its breaker known), not ready again when NATS goes away, ready when it
is back. Alive throughout. Readiness is polled, as Kubernetes does, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from docs_harness import ROOT, Block, compare, parse
from helpers import (
    Events,
    free_port,
    free_ports,
    heartbeat_seen,
    kv_keys,
    start_cli,
    wait_until,
)
from sandbox_fixtures import KEY
from worker_support import POOL, TENANT, assignment, publish, toml, work_state

from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

READY_S = 30.0
DOC = ROOT / "docs" / "KUBERNETES.md"


async def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        r = await http.get(f"http://127.0.0.1:{port}{path}")
    return r.status_code, r.json()


async def answers(
    port: int, path: str, status: int, what: str, when: Callable[[dict[str, Any]], bool] = bool
) -> dict[str, Any]:
    """Poll `path` until it answers `status` with a body that `when` accepts (the process may
    still be opening its port, binding its consumers...)."""
    seen: list[Any] = []

    async def check() -> dict[str, Any] | None:
        try:
            code, body = await probe(port, path)
        except httpx.TransportError as e:
            seen.append(repr(e))
            return None
        seen.append((code, body))
        return body if code == status and when(body) else None

    try:
        return await wait_until(check, READY_S, what, interval=0.1)
    except TimeoutError as e:
        raise AssertionError(f"{what}: last answers {seen[-3:]}") from e


@contextlib.asynccontextmanager
async def service(log: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await start_cli(log, *args)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_not_ready_until_nats_is_up_and_again_after_it_goes(tmp_path: Path) -> None:
    """A router and a worker started before their NATS: alive, not ready; ready once NATS is
    up; not ready while it is down; ready when it is back."""
    nats_port = free_port()
    url = f"nats://127.0.0.1:{nats_port}"
    async with SandboxServer(SandboxConfig(api_key=KEY)) as sandbox:
        cfg = tmp_path / "c.toml"
        cfg.write_text(toml(sandbox.url))
        rport, wport = free_ports(2)
        common = ["--nats", url, "--config", str(cfg), "--metrics-port"]
        async with (
            service(tmp_path / "router.log", "router", *common, str(rport)),
            service(tmp_path / "worker.log", "worker", *common, str(wport), "--pool", POOL),
        ):
            for port in (rport, wport):
                body = await answers(port, "/readyz", 503, "not ready without NATS")
                assert body["ready"] is False and "connecting to NATS" in body["reason"]
                assert await probe(port, "/healthz") == (200, {"status": "ok"})
            nats = NatsServer(port=nats_port)
            await nats.start()
            try:
                for port in (rport, wport):
                    body = await answers(port, "/readyz", 200, "ready once NATS is up")
                    assert set(body["checks"].values()) == {"ok"}
                # The worker's checks name its pool's consumer and provider; the router's its own.
                _, w = await probe(wport, "/readyz")
                assert {"stopping", "nats", "consumers", f"provider:{POOL}"} == set(w["checks"])
                code, text = await _metrics(wport)
                assert code == 200 and "chainyard_in_flight" in text

                await nats.stop(keep_store=True)
                for port in (rport, wport):
                    body = await answers(port, "/readyz", 503, "not ready once NATS is gone")
                    assert "not connected" in body["checks"]["nats"], body
                    assert await probe(port, "/healthz") == (200, {"status": "ok"})
                # docs/KUBERNETES.md shows this answer (for a pool named openai): as it is.
                shown = next(b for b in parse(DOC) if '"ready": false' in b.text)
                answer = json.dumps(body).replace(f'"provider:{POOL}"', '"provider:openai"')
                compare(Block(DOC, shown.line, "json", shown.text), answer)

                await nats.start()  # the same port and store again
                for port in (rport, wport):
                    await answers(port, "/readyz", 200, "ready again when NATS is back")
            finally:
                await nats.stop()


async def _metrics(port: int) -> tuple[int, str]:
    async with httpx.AsyncClient(timeout=5.0) as http:
        r = await http.get(f"http://127.0.0.1:{port}/metrics")
    return r.status_code, r.text


async def test_worker_not_ready_while_its_provider_is_unreachable_and_unknown(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """An LLM worker whose provider cannot be reached is not ready, until the router keeps a
    breaker for the pool's deployment (the outage is known and routed around)."""
    closed = free_port()  # nothing listens there
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml(f"http://127.0.0.1:{closed}"))
    port = free_port()
    args = ["--nats", nats_server.url, "--config", str(cfg), "--metrics-port", str(port)]
    async with service(tmp_path / "worker.log", "worker", *args, "--pool", POOL):
        body = await answers(
            port,
            "/readyz",
            503,
            "connected and bound, not ready: provider unreachable",
            lambda b: b["checks"].get("consumers") == "ok",
        )
        why = body["checks"][f"provider:{POOL}"]
        assert f"unreachable at 127.0.0.1:{closed}" in why and "no breaker" in why, body
        assert body["checks"]["nats"] == "ok" and f"provider:{POOL}" in body["reason"]
        bus = await open_bus(nats_server.url, name="test")
        try:
            await bus.breakers.put("d-free", b'{"status":"open","reason":"test"}')
            await answers(port, "/readyz", 200, "ready once the breaker is known")
        finally:
            await bus.close()


async def test_a_tool_pool_process_serves_only_its_tool(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """`worker --tools M:A --pool tool.NAME` (one Deployment per tool pool) serves that tool only,
    and is ready with no provider to check."""
    picked, port = "weather", free_port()
    args = [
        "--nats",
        nats_server.url,
        "--tools",
        "chainyard.demo:tools",
        "--pool",
        f"tool.{picked}",
    ]
    async with service(tmp_path / "tools.log", "worker", *args, "--metrics-port", str(port)):
        body = await answers(port, "/readyz", 200, "the tool worker is ready")
        assert set(body["checks"]) == {"stopping", "nats", "consumers"}
        bus = await open_bus(nats_server.url, name="test")
        try:
            await heartbeat_seen(bus.capacity, f"tool.{picked}")
            keys = await kv_keys(bus.js, bus.topology.capacity_kv.bucket)
            assert {k.split(".")[1] for k in keys} == {picked}, keys
            durables = await bus.js.consumers_info(bus.topology.work.name)
            assert [c.name for c in durables] == [f"pool-tool_{picked}"]
        finally:
            await bus.close()


async def test_a_draining_worker_says_so_until_its_call_ends(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """SIGTERM during a call: /readyz turns 503 (`stopping`) while the worker finishes the call,
    /healthz stays 200, and the step's result is published before the process exits 0."""
    async with SandboxServer(SandboxConfig(latency_ms=3000)) as sandbox:
        cfg = tmp_path / "c.toml"
        cfg.write_text(toml(sandbox.url))
        port = free_port()
        args = ["--nats", nats_server.url, "--config", str(cfg), "--metrics-port", str(port)]
        bus = await open_bus(nats_server.url, name="test")
        try:
            async with service(tmp_path / "w.log", "worker", *args, "--pool", POOL) as proc:
                await answers(port, "/readyz", 200, "the worker is ready")
                subject = bus.subjects.event(TENANT, "drain-1", "step.completed")
                async with Events(bus.nc, subject) as events:
                    await publish(bus, assignment("drain-1"))

                    async def delivered() -> bool:
                        return (await work_state(bus))[1] == 1  # ack pending: in the call

                    await wait_until(delivered, 10.0, "the step in the worker's hands")
                    proc.terminate()
                    body = await answers(port, "/readyz", 503, "not ready while draining")
                    assert body["checks"]["stopping"] == "draining before exit", body
                    assert await probe(port, "/healthz") == (200, {"status": "ok"})
                    await events.wait(lambda ev: ev.step_id == "s", 20.0)
                    assert await asyncio.wait_for(proc.wait(), 20.0) == 0
        finally:
            await bus.close()
