"""Tenants and chain ends: two tenants that use the same chain ids never touch each other, a
reused id within a tenant is refused without ending the chain that holds it, and every chain
ends: a cancelled one, one past its deadline, one whose step kills its worker every time.

Two routers, three LLM workers and a tool worker, as processes, in every scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from chaosharness import (
    TENANTS,
    Ledger,
    Proc,
    Stack,
    diamond,
    expected_output,
    pairs,
    scale,
    tool_diamond,
    wait_all_ended,
    wait_count,
)

from chainyard.client import Client
from chainyard.contracts import ChainCompleted, ChainRejected

TA, TB = TENANTS


async def test_tenant_cancels_while_other_tenants_same_id_runs(
    stack: Stack, ledger: Ledger
) -> None:
    """ta and tb run chains under the same ids; while both tenants' tool steps are running,
    ta cancels its chains. ta's end cancelled, their calls cancelled in the worker; tb's run
    on untouched and complete with their own answers."""
    s = stack
    await s.deploy(tools=1)
    n = scale(10, 5)
    chains = pairs("cx", n, tool_diamond, tool="nap", ms=3000)
    await s.load.run(chains)
    # both tenants' naps are in the tool worker: the cancel finds calls of both under each id
    await wait_count(lambda: len(list(s.dir.glob("entered.*"))) == 2 * n, 30, "every nap to start")
    async with await Client.connect(s.server.url, TA) as ta:
        for _, c in chains[::2]:
            await ta.cancel(c.id, reason="ta changed its mind")
    await wait_all_ended(s.bus.js, s.load.accepted, 60)
    expect = {(t, c.id): "cancelled" if t == TA else "completed" for t, c in chains}
    await wait_count(lambda: len(list(s.dir.glob(f"done.{TB}-*"))) == n, 30, "tb's naps to return")
    r = await s.audit(
        ledger,
        expect=expect,
        reasons={k: "ta changed its mind" for k, v in expect.items() if v == "cancelled"},
    )
    assert r.cancelled == n and r.completed == n
    assert not list(s.dir.glob(f"done.{TA}-*")), "a cancelled chain's call ran to its end"


async def test_reused_ids_within_and_across_tenants(stack: Stack, ledger: Ledger) -> None:
    """Both tenants use the same ids. Then ta submits each of its chains again (accepted once,
    run once: the client gets the first run's end) and a different chain under each id
    (refused, `id_in_use`, the chain holding the id untouched and never ended by it)."""
    s = stack
    await s.deploy()
    n = scale(40, 15)
    chains = pairs("re", n)
    await s.load.run(chains)
    await wait_all_ended(s.bus.js, s.load.accepted, 60)
    again = [c for t, c in chains if t == TA][: scale(10, 4)]
    async with await Client.connect(s.server.url, TA) as ta:
        for c in again:
            same = await ta.run(c, timeout=30)
            assert isinstance(same, ChainCompleted), same
            assert same.output.text == expected_output(c)
            fresh = diamond(TA, f"{c.id}x")
            other = await ta.run(fresh, timeout=30)  # a fresh id is simply a new chain
            assert isinstance(other, ChainCompleted), other
            s.load.accepted.add((TA, fresh.id))
            s.load.outputs[(TA, fresh.id)] = expected_output(fresh) or ""
            different = diamond(TB, c.id)  # tb's chain text, under ta's used id
            refused = await ta.run(different, timeout=30)
            assert isinstance(refused, ChainRejected) and refused.id_in_use, refused
    r = await s.audit(ledger)
    assert r.notes.get("id_in_use_rejections") == len(again), r.notes


async def test_chain_past_its_deadline_ends(stack: Stack, ledger: Ledger) -> None:
    """ta's chains have a 1.5 s deadline and a tool step that would take two minutes; tb's,
    under the same ids, have none and a short one. ta's end `chain.failed` "deadline exceeded"
    (the router's timer, not the tool's return) and their running calls are cancelled; tb's
    complete."""
    s = stack
    await s.deploy(tools=1)
    n = scale(10, 5)
    slow = [
        (TA, tool_diamond(TA, f"dl-{i:04d}", "nap", deadline_ms=1500, ms=120_000)) for i in range(n)
    ]
    quick = [(TB, tool_diamond(TB, f"dl-{i:04d}", "nap", ms=50)) for i in range(n)]
    await s.load.run(slow + quick)
    # well before the naps could end: only the deadline can end ta's chains in time
    await wait_all_ended(s.bus.js, s.load.accepted, 45)
    expect = {(t, c.id): "failed" if t == TA else "completed" for t, c in slow + quick}
    reasons = {(TA, c.id): "deadline exceeded" for _, c in slow}
    r = await s.audit(ledger, expect=expect, reasons=reasons)
    assert r.failed == n and r.completed == n


@contextlib.asynccontextmanager
async def _supervised(s: Stack, registry: str) -> AsyncIterator[list[Proc]]:
    """Keep one tool worker of `registry` running, as a process supervisor would: each time it
    exits, start another. Yields the list of every process started."""
    started = [await s.procs.tools(registry)]
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            await started[-1].proc.wait()
            if not stop.is_set():
                started.append(await s.procs.tools(registry))

    task = asyncio.create_task(watch())
    try:
        yield started
    finally:
        stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_poison_step_dead_lettered_and_chain_ends(stack: Stack, ledger: Ledger) -> None:
    """A tool step that ends its worker process every time it runs (ta's and tb's chains under
    the same ids). The supervisor restarts the worker; after the worker-side bound of five
    deliveries the step is not run again: it ends as a dead letter in CY_DLQ (reason, tenant,
    chain, step) plus `step.failed`, so its chain fails. Good chains beside it complete."""
    s = stack
    await s.deploy()
    n = scale(3, 2)
    poison = pairs("px", n, tool_diamond, tool="crash")
    good = pairs("ok", scale(20, 10))
    async with _supervised(s, "chaos_tools:poison") as started:
        await s.load.run(poison + good)
        await wait_all_ended(s.bus.js, s.load.accepted, 120)
    crashes = sum(p.proc.returncode == 17 for p in started)
    assert crashes >= 5, f"the poison step crashed {crashes} workers, fewer than its 5 deliveries"
    expect = {(t, c.id): "failed" for t, c in poison} | {(t, c.id): "completed" for t, c in good}
    await s.audit(
        ledger,
        expect=expect,
        expected_dead={(t, c.id, "t") for t, c in poison},
        notes={"worker_crashes": crashes},
    )
