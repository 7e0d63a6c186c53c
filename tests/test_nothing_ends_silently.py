"""Nothing ends silently, on a real nats-server: poison work (a step that kills every worker
process that takes it) is failed and dead-lettered; a chain's deadline ends it and drops its
queued and in-flight work; a tool past its pool's timeout fails its step."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec
from helpers import (
    Events,
    alive,
    chain_log,
    children_of,
    heartbeat_seen,
    kill_all,
    python_env,
    running,
    stream_count,
    stream_messages_eventually,
    wait_until,
)
from poison_tools import CRASH_EXIT

from chainyard.client import Client
from chainyard.contracts import (
    Assignment,
    Chain,
    ChainFailed,
    Config,
    StepFailed,
    Timer,
    ToolPoolConfig,
    ToolStep,
    WaitStep,
    assignment_decoder,
    encode,
    load_config,
    state_decoder,
)
from chainyard.ledger import audit
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus, ensure_consumer, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.stack import tool_workers
from chainyard.workers.runtime import Result, Worker
from chainyard.workers.tools import Tools

TENANT = "acme"
TESTS = Path(__file__).parent


async def start_tool_worker(url: str, config: Path, log: Path) -> asyncio.subprocess.Process:
    """`chainyard worker --tools poison_tools:tools` as its own process (tests/ importable)."""
    env = python_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    out = log.open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainyard.cli", "worker", "--nats", url,
            "--config", str(config), "--tools", "poison_tools:tools",
            stdout=out, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
    finally:
        out.close()


async def drained(bus: Bus, stream: str) -> bool:
    return (await bus.js.stream_info(stream)).state.messages == 0


async def test_poison_step_is_failed_and_dead_lettered_after_killing_every_worker(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "chainyard.toml"
    cfg_path.write_text('work_ack_wait_s = 1.0\ntools = ["crash"]\n')
    cfg = load_config(cfg_path)
    bound = cfg.topology.work_max_deliver
    bus = await open_bus(nats_server.url, name="test", topology=cfg.topology)
    topo = bus.topology
    chain = Chain(id="poison", steps=[ToolStep(id="boom", tool="crash", args={"n": 1})])
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with (
            Events(bus.nc, bus.subjects.chain_events(TENANT, chain.id)) as ev,
            running(Router(bus, cfg)),
        ):
            await bus.js.publish(bus.subjects.submit(TENANT), encode(chain))
            # Each worker process takes the step and dies of it; the next one gets it again
            # once the ack wait has passed.
            for i in range(bound):
                proc = await start_tool_worker(nats_server.url, cfg_path, tmp_path / f"w{i}.log")
                procs.append(proc)
                code = await asyncio.wait_for(proc.wait(), 60)
                assert code == CRASH_EXIT, (tmp_path / f"w{i}.log").read_text()
                assert ev.matching(lambda e: isinstance(e, StepFailed | ChainFailed)) == []
            # The next delivery is past the bound: this worker does not run it.
            last = await start_tool_worker(nats_server.url, cfg_path, tmp_path / "last.log")
            procs.append(last)
            ended = await ev.ended(chain.id, timeout=60)
            assert last.returncode is None and alive(last.pid)

        why = f"the step crashed or hung its worker on {bound} deliveries"
        assert isinstance(ended, ChainFailed), ended
        assert ended.step_id == "boom" and ended.error is not None
        assert ended.error.cls == "fatal" and ended.error.message.startswith(why)
        assert why in ended.reason
        logged = await chain_log(bus.js, TENANT, chain.id)
        (failed,) = [e for e in logged if isinstance(e, StepFailed)]
        assert f"-{last.pid}-" in failed.worker and failed.error.cls == "fatal"

        (dead,) = await stream_messages_eventually(bus.js, topo.dlq.name, "cy.dlq.work", 1)
        h = dead.headers or {}
        assert h["Cy-Reason"].startswith(why)
        assert (h["Cy-Subject"], h["Cy-Tenant"], h["Cy-Chain"], h["Cy-Step"]) == (
            "cy.work.tool.crash",
            TENANT,
            chain.id,
            "boom",
        )
        a: Assignment = assignment_decoder.decode(dead.data)
        assert (a.chain_id, a.step_id, a.attempt) == (chain.id, "boom", 1)
        # The work is gone from the queue (terminated, not left to be redelivered).
        await wait_until(lambda: drained(bus, topo.work.name), 10, "the work queue to drain")
        consumer = topo.pool_consumer("tool.crash").durable
        info = await bus.js.consumer_info(topo.work.name, consumer)
        assert info.config.max_deliver == -1 and info.num_ack_pending == 0

        report = await audit(bus.js, [(TENANT, chain.id)], expect="failed", allow_dead_letters=True)
        assert (report.lost, report.duplicated, report.unexpected) == ([], [], [])

        last.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(last.wait(), 15) == 0, (tmp_path / "last.log").read_text()
    finally:
        await kill_all(procs)
        await bus.close()
    assert [c for c in children_of(os.getpid()) if c[1] != "nats-server"] == []


async def test_a_worker_lifts_the_old_max_deliver_of_its_pool_consumer(bus: Bus) -> None:
    """Deployments made before: their pool consumer has max_deliver 5, so the server would drop
    poison work at the bound, before a worker could fail it. A starting worker updates it."""
    topo = bus.topology
    old = topo.pool_consumer("sim")
    await ensure_consumer(bus.js, topo.work, msgspec.structs.replace(old, max_deliver=5))
    assert (await bus.js.consumer_info(topo.work.name, old.durable)).config.max_deliver == 5

    async def never(a: Assignment, on_delta: object) -> Result:
        raise AssertionError("no work is sent")

    async with running(Worker(bus, "sim", never, heartbeat_s=0.2)):
        await heartbeat_seen(bus.capacity, "sim")
        info = await bus.js.consumer_info(topo.work.name, old.durable)
        assert info.config.max_deliver == -1


async def test_deadline_fails_the_chain_and_drops_its_queued_and_running_work(bus: Bus) -> None:
    cfg = Config(tools=["block"])
    entered: list[str] = []
    cancelled: list[str] = []

    async def block(a: Assignment, on_delta: object) -> Result:
        """Runs until cancelled: only the chain's cancel can end it (no deadline of its own)."""
        entered.append(a.step_id)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(a.step_id)
            raise
        raise AssertionError("unreachable")

    # One slot: one of the two tool steps runs, the other stays queued in the work stream.
    worker = Worker(bus, "tool.block", block, slots=1, models=["block"], heartbeat_s=0.2)
    chain = Chain(
        id="late",
        deadline_ms=1500,
        steps=[
            WaitStep(id="hold", signal="never"),
            ToolStep(id="a", tool="block", args={}),
            ToolStep(id="b", tool="block", args={}),
        ],
    )
    topo = bus.topology
    async with (
        running(worker, Router(bus, cfg)),
        Events(bus.nc, bus.subjects.chain_events(TENANT, chain.id)) as ev,
    ):
        await heartbeat_seen(bus.capacity, "tool.block")
        ended = await Client(bus.nc, TENANT, topo).run(chain, timeout=30)
        assert isinstance(ended, ChainFailed), ended
        assert ended.reason.startswith("deadline exceeded (1500 ms); unfinished: ")
        assert "step 'hold' waiting for signal 'never'" in ended.reason
        assert "step 'a' dispatched to" in ended.reason
        assert "step 'b' dispatched to" in ended.reason
        assert ended.duration_ms >= 1500
        assert {s.step_id: s.status for s in ended.steps} == {
            "hold": "cancelled",
            "a": "cancelled",
            "b": "cancelled",
        }
        # The running call is cancelled, the queued one dropped without running.
        for sid in ("a", "b"):
            got = await ev.wait(lambda e, s=sid: isinstance(e, StepFailed) and e.step_id == s, 10)
            assert isinstance(got, StepFailed) and got.error.cls == "cancelled"
        assert len(entered) == 1 and cancelled == entered
        await wait_until(lambda: drained(bus, topo.work.name), 10, "the work queue to drain")
        await wait_until(lambda: drained(bus, topo.timers.name), 10, "the timers to drain")

        # The deadline timer again (a copy that outlived the stream's duplicate window):
        # nothing changes, the chain's end is not published twice.
        entry = await bus.chains.get(f"{TENANT}.{chain.id}")
        timer = Timer(
            kind="deadline",
            tenant=TENANT,
            chain_id=chain.id,
            step_id="_chain",
            attempt=0,
            due_at_ms=state_decoder.decode(entry.value).deadline_at_ms or 0,
        )
        await bus.js.publish(
            bus.subjects.timer(TENANT, chain.id, "_chain"),
            encode(timer),
            headers={"Nats-Msg-Id": "a-later-copy"},
        )
        await wait_until(lambda: drained(bus, topo.timers.name), 10, "the copy to be handled")
        assert (await bus.chains.get(f"{TENANT}.{chain.id}")).revision == entry.revision
    logged = await chain_log(bus.js, TENANT, chain.id)
    assert [type(e).__name__ for e in logged].count("ChainFailed") == 1
    base = f"cy.events.{TENANT}.{chain.id}"
    assert await stream_count(bus.js, topo.events.name, f"{base}.chain.failed") == 1
    assert len(entered) == 1  # the dropped step never reached the tool
    report = await audit(bus.js, [(TENANT, chain.id)], expect="failed")
    assert (report.lost, report.duplicated, report.unexpected) == ([], [], [])


async def test_a_tool_past_its_pools_timeout_fails_its_step(bus: Bus) -> None:
    tools = Tools()

    @tools.tool
    async def slow() -> str:
        """Never answers."""
        await asyncio.Event().wait()
        return "never"

    cfg = Config(tools=["slow"], tool_pools=[ToolPoolConfig(name="slow", timeout_s=0.3)])
    chain = Chain(id="slowpoke", steps=[ToolStep(id="s", tool="slow", args={})])
    async with running(Router(bus, cfg), *tool_workers(bus, tools, config=cfg)):
        await heartbeat_seen(bus.capacity, "tool.slow")
        ended = await Client(bus.nc, TENANT, bus.topology).run(chain, timeout=30)
    assert isinstance(ended, ChainFailed), ended
    assert ended.error is not None and ended.error.cls == "timeout"
    assert ended.error.message == "tool 'slow' did not return within 0.3 s"
    assert ended.reason.startswith("step 's' on ") and "timed out" in ended.reason
    assert "deadline" not in ended.reason
