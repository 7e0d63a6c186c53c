"""Process faults under load: workers and the router SIGKILLed or SIGSTOPped at the worst moments.

Every scenario ends with the ledger: each accepted chain ended once, each step completed once.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from chaosharness import (
    Ledger,
    Stack,
    heartbeat,
    llm_chain,
    progress,
    scale,
    tool_chain,
    wait_all_ended,
    wait_count,
)


async def test_baseline_load(stack: Stack, ledger: Ledger) -> None:
    """No fault: the reference the other scenarios are compared with."""
    s = stack
    await s.procs.router()
    await s.procs.worker()
    await s.procs.worker()
    await heartbeat(s.bus.nc, "sim")
    n = scale(500, 150)
    await s.load.run([llm_chain(f"base-{i}") for i in range(n)])
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    s.procs.assert_alive()
    await ledger.audit(s.bus, s.load.accepted, notes={"calls": s.sandbox.counts["openai.chat"]})


async def test_worker_sigkill_mid_call(stack: Stack, ledger: Ledger) -> None:
    """Workers die inside provider calls (the sandbox holds each 300 ms); replacements join."""
    s = stack
    await s.sandbox.configure(latency_ms=300)
    await s.procs.router()
    workers = [await s.procs.worker(), await s.procs.worker()]
    await heartbeat(s.bus.nc, "sim")
    n = scale(300, 120)
    load = asyncio.create_task(s.load.run([llm_chain(f"wk-{i}") for i in range(n)]))
    kills = 0
    for round_ in range(scale(4, 2)):
        await progress(s.bus.js, (round_ + 1) * n // 6, 60)
        victim = workers.pop(0)
        assert await victim.kill() == -signal.SIGKILL
        kills += 1
        workers.append(await s.procs.worker())
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    await ledger.audit(s.bus, s.load.accepted, notes={"kills": kills})


async def test_worker_sigkill_between_publish_and_ack(stack: Stack, ledger: Ledger) -> None:
    """A worker stores its result event, then dies before acking the work: the redelivered
    message finds the result recorded; the step counts once."""
    s = stack
    hook = {"CY_CHAOS_KILL_AFTER_PUBLISH": str(s.dir)}
    await s.procs.router()
    await s.procs.worker()
    killer = await s.procs.tools(env=hook)
    await heartbeat(s.bus.nc, "tool.gate")
    kills = 0
    n = scale(60, 30)
    chains = [tool_chain(f"pa-{i}") if i % 2 else llm_chain(f"pa-{i}") for i in range(n)]
    for round_ in range(3):
        (s.dir / "kill-after-publish").touch()
        part = chains[round_ * n // 3 : (round_ + 1) * n // 3]
        await s.load.run(part)
        await wait_count(lambda k=killer: not k.running, 30, "the tool worker to kill itself")
        kills += 1
        assert killer.proc.returncode == -signal.SIGKILL
        assert list(s.dir.glob("killed-after-publish.*")), "the hook did not fire"
        killer = await s.procs.tools(env=hook)
    await wait_all_ended(s.bus.js, s.load.accepted, 60)
    await ledger.audit(s.bus, s.load.accepted, notes={"kills": kills})


@pytest.mark.chaos_config(ack_wait_s=2.0)
async def test_worker_sigstop_past_ack_wait_late_result(stack: Stack, ledger: Ledger) -> None:
    """Worker A is frozen with steps in hand past the ack wait; B completes them; A resumes and
    publishes its late results: nothing changes (same message ids, compare-and-set)."""
    s = stack
    await s.procs.router()
    (s.dir / "hold").touch()
    a = await s.procs.tools()
    await heartbeat(s.bus.nc, "tool.gate")
    n = scale(20, 10)
    await s.load.run([tool_chain(f"zz-{i}") for i in range(n)])
    await wait_count(
        lambda: len(list(s.dir.glob(f"entered.*.{a.pid}"))) == n, 30, "A to hold every step"
    )
    a.signal(signal.SIGSTOP)
    (s.dir / "hold").unlink()
    (s.dir / "release").touch()
    b = await s.procs.tools()
    await wait_all_ended(s.bus.js, s.load.accepted, 60)
    assert len(list(s.dir.glob(f"done.*.{b.pid}"))) == n  # B did every step
    a.signal(signal.SIGCONT)
    await wait_count(
        lambda: len(list(s.dir.glob(f"done.*.{a.pid}"))) == n, 30, "A's late calls to return"
    )
    consumer = s.topology.pool_consumer("tool.gate").durable

    async def settled() -> bool:
        info = await s.bus.js.consumer_info(s.topology.work.name, consumer)
        return info.num_ack_pending == 0 and info.num_pending == 0

    await wait_count(settled, 30, "A's late acks and B's acks to settle the work queue")
    s.procs.assert_alive(a, b)
    await ledger.audit(s.bus, s.load.accepted, notes={"late_results": n})


@pytest.mark.chaos_config(ack_wait_s=2.0)
async def test_long_call_kept_alive_by_in_progress(stack: Stack, ledger: Ledger) -> None:
    """Calls of 5 s with an ack wait of 2 s: in-progress acks keep them; no call is repeated."""
    s = stack
    await s.sandbox.configure(latency_ms=5000)
    await s.procs.router()
    await s.procs.worker()
    await s.procs.worker()
    await heartbeat(s.bus.nc, "sim")
    n = scale(40, 20)
    await s.load.run([llm_chain(f"long-{i}", steps=1) for i in range(n)])
    await wait_all_ended(s.bus.js, s.load.accepted, 60)
    calls = s.sandbox.counts["openai.chat"]
    assert calls == n, f"{calls} provider calls for {n} steps: a long call was redelivered"
    await ledger.audit(s.bus, s.load.accepted, notes={"calls": calls})


async def test_router_sigkill_after_state_before_effects(stack: Stack, ledger: Ledger) -> None:
    """The router dies after its compare-and-set and before it publishes the next steps; the
    restarted router re-derives the effects from the redelivered message."""
    s = stack
    hook = {"CY_CHAOS_KILL_AFTER_CAS": str(s.dir)}
    router = await s.procs.router(env=hook)
    await s.procs.worker()
    await heartbeat(s.bus.nc, "sim")
    n = scale(200, 90)
    load = asyncio.create_task(s.load.run([llm_chain(f"rc-{i}", steps=3) for i in range(n)]))
    kills = 0
    for _ in range(scale(3, 2)):
        (s.dir / "kill-after-cas").touch()
        await wait_count(lambda r=router: not r.running, 60, "the router to kill itself")
        assert router.proc.returncode == -signal.SIGKILL
        kills += 1
        router = await s.procs.router(env=hook)
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    await ledger.audit(s.bus, s.load.accepted, notes={"kills": kills})


async def test_router_sigkill_repeatedly_under_load(stack: Stack, ledger: Ledger) -> None:
    s = stack
    router = await s.procs.router()
    await s.procs.worker()
    await s.procs.worker()
    await heartbeat(s.bus.nc, "sim")
    n = scale(600, 200)
    load = asyncio.create_task(s.load.run([llm_chain(f"rr-{i}", steps=3) for i in range(n)]))
    kills = 0
    for k in range(scale(5, 3)):
        await progress(s.bus.js, (k + 1) * n // 8, 120)
        assert await router.kill() == -signal.SIGKILL
        kills += 1
        router = await s.procs.router()
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 180)
    await ledger.audit(s.bus, s.load.accepted, notes={"kills": kills})
