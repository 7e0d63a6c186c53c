"""The headline: the deployment users run, under every fault at once.

A provider that fails the ways real ones do (faultproxy.py: 500, 503 and 429 with retry-after,
resets mid-body, stalls past the pool's timeout, bad JSON, an HTML 502), router replicas and
workers SIGKILLed at random every few seconds and restarted, and two tenants submitting
multi-step chains (fan-out, fan-in, references) under the same ids. Every chain must end exactly
once, with the answer its own steps produced: lost=0 duplicated=0 unexpected=0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from chaosharness import (
    Ledger,
    Proc,
    Stack,
    ended_ids,
    pairs,
    rng,
    scale,
    wait_all_ended,
    write_config,
)
from faultproxy import FaultProxy

FAULTY = {"max_attempts": 5, "timeout_s": 2.0}  # stalls (3 s) outlast the pool's timeout


@contextlib.asynccontextmanager
async def faulty_provider(s: Stack, rate: float) -> AsyncIterator[FaultProxy]:
    """Point the stack's pools at a fault proxy in front of the sandbox (before deploy)."""
    async with FaultProxy(s.sandbox.url, rate=rate, stall_s=3.0) as proxy:
        write_config(s.config, proxy.url, pools=2, **FAULTY)
        yield proxy


def _faults(proxy: FaultProxy) -> dict[str, int]:
    return {f"fault_{k}": v for k, v in sorted(proxy.counts.items()) if k != "ok"}


async def test_provider_mixed_faults(stack: Stack, ledger: Ledger) -> None:
    """15% of provider calls fail in mixed ways, no process fault: every chain ends once;
    failures are retried, so nearly all complete."""
    s = stack
    async with faulty_provider(s, 0.15) as proxy:
        await s.deploy()
        await s.load.run(pairs("mx", scale(150, 50)))
        await wait_all_ended(s.bus.js, s.load.accepted, 180)
        s.procs.assert_alive()
        r = await s.audit(ledger, expect=None, notes=_faults(proxy))
    assert r.completed >= 0.9 * r.accepted, r.details()
    assert len(proxy.counts) >= 6, f"too few kinds of fault drawn: {proxy.counts}"


@pytest.mark.timeout(scale(1800, 400))
async def test_soak_faults_and_kills(stack: Stack, ledger: Ledger) -> None:
    """Three routers and four workers over two pools; 10% of provider calls fail in mixed
    ways; every 2-4 s a random router or worker is SIGKILLed and restarted, while two tenants
    run 1,000 four-step chains (short: 200), 10 a second, under the same ids."""
    s = stack
    pick = rng(1015)
    s.load.give_up_s = 120
    async with faulty_provider(s, 0.10) as proxy:
        d = await s.deploy(routers=3, workers=4)
        n = scale(500, 100)
        t0 = time.monotonic()
        # 10 chains a second: a steady stream of clients, not one burst that would only measure
        # how long steps queue for capacity (capacity_wait_s)
        load = asyncio.create_task(s.load.run(pairs("soak", n), rate=10.0))
        kills: Counter[str] = Counter()
        # Kill, routers and workers in turn, until nine in ten chains have ended (and at least a
        # few kills happened): the rest, and the replays of what the dead held, then finish
        # with every process alive.
        while kills.total() < scale(80, 20):
            await asyncio.sleep(pick.uniform(2.0, 4.0))  # the fault's interval
            done = len(await ended_ids(s.bus.js))
            enough = load.done() and done >= 0.9 * len(s.load.accepted)
            if enough and kills.total() >= scale(20, 6):
                break
            group = d.routers if kills.total() % 2 == 0 else d.workers
            i = pick.randrange(len(group))
            victim = group[i]
            assert await victim.kill() == -signal.SIGKILL
            kills["router" if group is d.routers else "worker"] += 1
            group[i] = await _replace(s, victim)
        await load
        missing = await wait_all_ended(s.bus.js, s.load.accepted, scale(600, 180))
        secs = round(time.monotonic() - t0, 1)
        s.procs.assert_alive(*d.routers, *d.workers)
        r = await s.audit(
            ledger,
            expect=None,
            notes={
                "router_kills": kills["router"],
                "worker_kills": kills["worker"],
                "load_secs": secs,
                **_faults(proxy),
            },
        )
    assert not missing
    assert len(s.load.accepted) == 2 * n, s.load.failed
    assert r.completed >= 0.9 * r.accepted, r.details()
    assert kills["router"] >= 3 and kills["worker"] >= 3, kills


async def _replace(s: Stack, victim: Proc) -> Proc:
    if victim.role == "router":
        return await s.procs.router()
    return await s.worker_like(victim)
