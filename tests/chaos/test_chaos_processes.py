"""Process faults under load: workers and routers SIGKILLed or SIGSTOPped at the worst moments.

Every scenario runs two router replicas and three workers over two pools, with two tenants
submitting the same chain ids (fan-out, fan-in, references), and ends with the ledger: each
accepted chain ended once with the answer its own steps produced, each step completed once.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest
from chaosharness import (
    Ledger,
    Stack,
    pairs,
    progress,
    rng,
    scale,
    tool_diamond,
    wait_all_ended,
    wait_count,
)


async def test_baseline_load(stack: Stack, ledger: Ledger) -> None:
    """No fault: the reference the other scenarios are compared with."""
    s = stack
    await s.deploy()
    n = scale(250, 60)
    await s.load.run(pairs("base", n))
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    s.procs.assert_alive()
    await s.audit(ledger, notes={"calls": s.sandbox.counts["openai.chat"]})


async def test_worker_sigkill_mid_call(stack: Stack, ledger: Ledger) -> None:
    """Workers die inside provider calls (the sandbox holds each 300 ms); replacements join."""
    s = stack
    await s.sandbox.configure(latency_ms=300)
    d = await s.deploy()
    n = scale(150, 50)
    load = asyncio.create_task(s.load.run(pairs("wk", n)))
    kills = 0
    for round_ in range(scale(4, 2)):
        await progress(s.bus.js, (round_ + 1) * 2 * n // 6, 60)
        victim = d.workers.pop(0)
        assert await victim.kill() == -signal.SIGKILL
        kills += 1
        d.workers.append(await s.worker_like(victim))
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    await s.audit(ledger, notes={"kills": kills})


async def test_worker_sigkill_between_publish_and_ack(stack: Stack, ledger: Ledger) -> None:
    """A tool worker stores its result event, then dies before acking the work: the
    redelivered message finds the result recorded; the step counts once."""
    s = stack
    hook = {"CY_CHAOS_KILL_AFTER_PUBLISH": str(s.dir)}
    d = await s.deploy(tools=1, tools_env=hook)
    killer = d.tools[0]
    kills = 0
    chains = pairs("pa", scale(30, 15), tool_diamond)
    for round_ in range(3):
        (s.dir / "kill-after-publish").touch()
        part = chains[round_ * len(chains) // 3 : (round_ + 1) * len(chains) // 3]
        await s.load.run(part)
        await wait_count(lambda k=killer: not k.running, 30, "the tool worker to kill itself")
        kills += 1
        assert killer.proc.returncode == -signal.SIGKILL
        assert list(s.dir.glob("killed-after-publish.*")), "the hook did not fire"
        killer = await s.procs.tools(env=hook)
    await wait_all_ended(s.bus.js, s.load.accepted, 60)
    await s.audit(ledger, notes={"kills": kills})


@pytest.mark.chaos_config(ack_wait_s=2.0)
async def test_worker_sigstop_past_ack_wait_late_result(stack: Stack, ledger: Ledger) -> None:
    """Tool worker A is frozen with steps in hand past the ack wait; B completes them; A
    resumes and publishes its late results: nothing changes (same message ids, CAS)."""
    s = stack
    (s.dir / "hold").touch()
    d = await s.deploy(tools=1)
    a = d.tools[0]
    chains = pairs("zz", scale(10, 5), tool_diamond)
    n = len(chains)
    await s.load.run(chains)
    await wait_count(
        lambda: len(list(s.dir.glob(f"entered.*.{a.pid}"))) == n, 30, "A to hold every step"
    )
    a.signal(signal.SIGSTOP)
    (s.dir / "hold").unlink()
    (s.dir / "release").touch()
    b = await s.procs.tools()
    await wait_all_ended(s.bus.js, s.load.accepted, 60)
    assert len(list(s.dir.glob(f"done.*.{b.pid}"))) == n  # B did every tool step
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
    await s.audit(ledger, notes={"late_results": n})


@pytest.mark.chaos_config(ack_wait_s=2.0)
async def test_long_call_kept_alive_by_in_progress(stack: Stack, ledger: Ledger) -> None:
    """Calls of 5 s with an ack wait of 2 s: in-progress acks keep them; no call is repeated."""
    s = stack
    await s.sandbox.configure(latency_ms=5000)
    await s.deploy()
    await s.load.run(pairs("long", scale(12, 6)))
    await wait_all_ended(s.bus.js, s.load.accepted, 90)
    calls = s.sandbox.counts["openai.chat"]
    r = await s.audit(ledger, notes={"calls": calls})
    assert calls == r.steps, f"{calls} provider calls for {r.steps} steps: a call was redelivered"


async def test_router_sigkill_after_state_before_effects(stack: Stack, ledger: Ledger) -> None:
    """A router dies after its compare-and-set and before it publishes the next steps; its
    events come back (after the engine's ack wait) to whichever replica, which re-derives the
    effects from the recorded state."""
    s = stack
    hook = {"CY_CHAOS_KILL_AFTER_CAS": str(s.dir)}
    d = await s.deploy(router_env=hook)
    n = scale(100, 40)
    load = asyncio.create_task(s.load.run(pairs("rc", n)))
    kills = 0
    for _ in range(scale(3, 2)):
        (s.dir / "kill-after-cas").touch()
        await wait_count(
            lambda: any(not r.running for r in d.routers), 60, "a router to kill itself"
        )
        dead = next(r for r in d.routers if not r.running)
        assert dead.proc.returncode == -signal.SIGKILL
        kills += 1
        d.routers[d.routers.index(dead)] = await s.procs.router(env=hook)
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 150)
    await s.audit(ledger, notes={"kills": kills})


async def test_router_sigkill_repeatedly_under_load(stack: Stack, ledger: Ledger) -> None:
    """A random replica of two is SIGKILLed and restarted, again and again."""
    pick = rng(11)
    await sigkill_routers_under_load(
        stack,
        ledger,
        "rr",
        scale(300, 80),
        rounds=scale(5, 3),
        shares=8,
        which=lambda k, replicas: pick.randrange(replicas),
    )


async def test_routers_sigkilled_while_both_handle_one_chain(stack: Stack, ledger: Ledger) -> None:
    """Both replicas handle the events of the same chains (the fan-out's two results arrive
    together, the sandbox answers in 30 ms); each replica in turn is SIGKILLed mid-load and
    restarted, so events of one chain are lost with one replica while the other advances it.
    The dead replica's events come back after the engine's ack wait, to either replica."""
    await stack.sandbox.configure(latency_ms=30)
    await sigkill_routers_under_load(
        stack,
        ledger,
        "both",
        scale(200, 60),
        rounds=scale(6, 4),
        shares=10,
        which=lambda k, replicas: k % replicas,  # alternately: each replica dies holding events
    )


async def sigkill_routers_under_load(
    s: Stack,
    ledger: Ledger,
    prefix: str,
    n: int,
    *,
    rounds: int,
    shares: int,
    which: Callable[[int, int], int],
) -> None:
    """The router replicas under a load of `n` pairs of chains: `rounds` times, once another
    1/`shares` of the load's chains has ended, replica `which(round, replicas)` is SIGKILLed
    and a new one started in its place; then every chain must end, as the ledger says."""
    d = await s.deploy()
    load = asyncio.create_task(s.load.run(pairs(prefix, n)))
    kills = 0
    for k in range(rounds):
        await progress(s.bus.js, (k + 1) * 2 * n // shares, 120)
        i = which(k, len(d.routers))
        assert await d.routers[i].kill() == -signal.SIGKILL
        kills += 1
        d.routers[i] = await s.procs.router()
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 180)
    await s.audit(ledger, notes={"kills": kills})


async def test_router_frozen_replica_resumes_with_stale_cache(stack: Stack, ledger: Ledger) -> None:
    """One replica is frozen (SIGSTOP) for 3 s, shorter than the engine's ack wait, while the
    other advances the chains it had cached; it resumes with that stale cache and the events it
    held. Its decisions must come from the recorded state, not its cache."""
    s = stack
    await s.sandbox.configure(latency_ms=20)
    d = await s.deploy()
    n = scale(200, 60)
    load = asyncio.create_task(s.load.run(pairs("frz", n)))
    freezes = 0
    for k in range(scale(4, 2)):
        await progress(s.bus.js, (k + 1) * 2 * n // 6, 120)
        victim = d.routers[k % len(d.routers)]
        victim.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(3.0)  # the fault's duration, not a wait for a result
        finally:
            victim.signal(signal.SIGCONT)
        freezes += 1
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    s.procs.assert_alive()
    await s.audit(ledger, notes={"freezes": freezes})
