"""Figure worker_cpu_us_per_call_1000rps_200ms: a worker's CPU per provider call at a user's load.

Not a throughput ceiling: steps arrive at a steady 1,000 a second (published on the work stream
in 10 ms ticks), each provider call takes 200 ms (the load sandbox, chainyard.sandbox.load), so
about 200 calls are in flight in one `chainyard worker` process (512 slots). The figure is the
worker process's CPU (user + system, from /proc) from the first publish to the last step event,
over the calls made. The baseline, in the same run and over the same span, is the sandbox's
CPU per call: the server side of the same exchanges, code no change of chainyard's touches, so
the ratio carries a machine's speed from one run to the next. (A bare httpx client was the first
choice of baseline: at 200 calls in flight httpx's pool spends ~13 ms of CPU a call here and
serves ~50 calls/s, so it cannot offer this load.)
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from typing import Any

from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

from .calibrate import load_average
from .core import Ctx, Figure, benchmark
from .workers import (
    POOL,
    TENANT,
    Completions,
    _has_heartbeat,
    assignments,
    cpu_s,
    sandbox,
    worker,
)

RATE = 1000  # calls a second
LATENCY_MS = 200.0
TICK_S = 0.01
SLOTS = 512  # room above the ~200 in flight, so that slots never pace the calls


async def _paced(n: int, one: Any) -> None:
    """Start `one(i)` for i < n at RATE a second, a tick's worth at a time (open loop)."""
    per_tick = round(RATE * TICK_S)
    start = time.perf_counter()
    for tick, first in enumerate(range(0, n, per_tick)):
        if (wait := start + tick * TICK_S - time.perf_counter()) > 0:
            await asyncio.sleep(wait)  # pacing the offered load, not waiting on a race
        await asyncio.gather(*(one(i) for i in range(first, min(first + per_tick, n))))


async def _worker(nats_url: str, url: str, sandbox_pid: int, n: int) -> dict[str, Any]:
    bus = await open_bus(nats_url, name="bench-provider-calls")
    c = Completions(n)

    sub = await bus.nc.subscribe(f"{bus.subjects.prefix}.events.{TENANT}.*.step.*", cb=c.on)
    payloads = assignments(n, "p")
    subject = bus.subjects.work(POOL)
    try:
        async with worker(nats_url, url, SLOTS, None) as proc:
            for _ in range(1200):  # up to 60 s for its first heartbeat (as bench.workers waits)
                if await _has_heartbeat(bus):
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the worker sent no heartbeat")

            async def one(i: int) -> None:
                await bus.js.publish(subject, payloads[i], headers={"Nats-Msg-Id": f"p{i}"})

            c0, s0, t0 = cpu_s(proc.pid), cpu_s(sandbox_pid), time.perf_counter()
            await _paced(n, one)
            await asyncio.wait_for(c.done.wait(), 60 + n / RATE)
            cpu, wall = cpu_s(proc.pid) - c0, time.perf_counter() - t0
            sandbox_cpu = cpu_s(sandbox_pid) - s0
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await bus.close()
    return {
        "cpu_us_per_call": round(cpu / n * 1e6, 1),
        "cpu_pct": round(100 * cpu / wall, 1),
        "sandbox_cpu_us_per_call": round(sandbox_cpu / n * 1e6, 1),
        "steps_per_s": round(c.per_s, 1),
        "failed": c.failed,
        "call_latency_p50_ms": round(statistics.median(c.latencies), 1) if c.latencies else None,
    }


@benchmark("provider_calls", ("worker_cpu_us_per_call_1000rps_200ms",))
async def provider_calls(ctx: Ctx) -> list[Figure]:
    """Worker CPU per provider call at 1,000 calls/s, 200 ms each, vs the sandbox's per call."""
    n = ctx.n("calls_n", 20_000, 2_000)
    load_before = load_average()
    async with NatsServer() as nats, sandbox(LATENCY_MS, None, load=True) as (url, spid):
        w = await _worker(nats.url, url, spid, n)
    if w["failed"]:
        raise RuntimeError(f"{w['failed']} of {n} steps failed")
    cond = {
        "calls": n,
        "offered_per_s": RATE,
        "provider_latency_ms": LATENCY_MS,
        "slots": SLOTS,
        "provider": "chainyard.sandbox.load, its own process",
        "worker": w,
        "cpu": "the worker process (all threads) and the sandbox process, from the first publish"
        " to the last step event, over the calls",
        "load_before": load_before,
        "load_after": load_average(),
    }
    return [
        Figure(
            "worker_cpu_us_per_call_1000rps_200ms", w["cpu_us_per_call"], "us",
            "sandbox_cpu_us_per_call", w["sandbox_cpu_us_per_call"], cond,
        )
    ]  # fmt: skip
