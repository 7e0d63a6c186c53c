"""Worker processes (`chainyard worker`): several share one pool; SIGTERM drains without loss."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from helpers import Events, alive, kill_all, wait_until
from worker_support import (
    TENANT,
    assignment,
    config,
    live_workers,
    publish,
    start_worker_process,
    toml,
    work_state,
)

from chainyard.contracts import StepCompleted, StepFailed
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

EVENTS = f"cy.events.{TENANT}.>"


def _done(e: object) -> bool:
    return isinstance(e, StepCompleted | StepFailed)


async def test_worker_processes_share_one_pool(nats_server: NatsServer, tmp_path: Path) -> None:
    n_workers, slots, n = 3, 4, 90
    procs: list[asyncio.subprocess.Process] = []
    async with SandboxServer(SandboxConfig(latency_ms=50, capture=0)) as sandbox:
        path = tmp_path / "chainyard.toml"
        path.write_text(toml(sandbox.url, slots=slots))
        bus = await open_bus(nats_server.url, name="t", topology=config(sandbox.url).topology)
        try:
            for i in range(n_workers):
                log = tmp_path / f"w{i}.log"
                procs.append(await start_worker_process(nats_server.url, path, log))

            async def all_up() -> bool:
                return len(await live_workers(bus)) == n_workers

            await wait_until(all_up, 30, "every worker's heartbeat")
            async with Events(bus.nc, EVENTS) as ev:
                await publish(bus, *[assignment(f"share{i}") for i in range(n)])
                await ev.wait(_done, timeout=60, count=n)
                events = [e for _, e in ev.received if _done(e)]
            assert all(isinstance(e, StepCompleted) for e in events), events[:3]
            # each step exactly once, by some worker
            assert sorted(e.chain_id for e in events) == sorted(f"share{i}" for i in range(n))
            assert sandbox.counts["openai.chat"] == n
            by_pid = {p.pid: sum(f"-{p.pid}-" in e.worker for e in events) for p in procs}
            assert all(c > 0 for c in by_pid.values()), by_pid  # every process got work
            assert sum(by_pid.values()) == n
        finally:
            await kill_all(procs)
            await bus.close()
    for p in procs:
        assert not alive(p.pid)


async def test_sigterm_drains_in_flight_work_and_loses_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    slots = 6
    procs: list[asyncio.subprocess.Process] = []
    async with SandboxServer(SandboxConfig(latency_ms=1500)) as sandbox:
        path = tmp_path / "chainyard.toml"
        path.write_text(toml(sandbox.url, slots=slots))
        bus = await open_bus(nats_server.url, name="t", topology=config(sandbox.url).topology)
        log = tmp_path / "w.log"
        try:
            proc = await start_worker_process(nats_server.url, path, log)
            procs.append(proc)
            await wait_until(lambda: live_workers(bus), 30, "the worker's heartbeat")
            async with Events(bus.nc, EVENTS) as ev:
                # twice the slots: one slot-full in flight, one waiting in the stream
                await publish(bus, *[assignment(f"drain{i}") for i in range(2 * slots)])
                await wait_until(
                    lambda: sandbox.counts["openai.chat"] == slots, 10, "a slot-full in flight"
                )
                assert ev.matching(_done) == []
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 20) == 0, log.read_text()
                done = [e for _, e in ev.received if _done(e)]
            # the calls in flight finished and were reported; nothing else was started
            assert len(done) == slots and all(isinstance(e, StepCompleted) for e in done), done
            assert sandbox.counts["openai.chat"] == slots
            left, pending, redelivered = await work_state(bus)
            assert (left, pending, redelivered) == (slots, 0, 0)  # the rest waits in the stream
            assert await live_workers(bus) == set()  # its heartbeat is gone
        finally:
            await kill_all(procs)
            await bus.close()
