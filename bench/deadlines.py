"""Figure deadline_cpu_ratio: what a chain's deadline costs, as chains with one pile up.

Every request through the gateway is a chain with a deadline (300 s unless the caller says),
so a busy gateway has as many deadlines waiting as it serves requests in five minutes. One-step
chains run 32 at a time through nats-server, `chainyard router` and `chainyard worker`, each its
own OS process, against the zero-latency load sandbox (as bench.added_latency). Rounds alternate
chains without a deadline and chains with a 300 s deadline, which none reaches: each deadline
round leaves `n` more deadlines waiting. The figure is the router's and nats-server's CPU per
chain in the last deadline round over the last round without (DESIGN-NOTES #8: deadlines are
message schedules, which the server holds; before, each waited as a naked message pending on a
consumer, and the server's and router's cost grew with their number).
"""

from __future__ import annotations

from typing import Any

from .added_latency import Driver, _closed_loop, one_pool
from .calibrate import load_average
from .core import Ctx, Figure, benchmark
from .workers import cpu_s

NAME = "deadline_cpu_ratio"
DEADLINE_MS = 300_000  # the gateway's default: no chain here reaches it
IN_FLIGHT = 32


async def _round(d: Driver, pids: dict[str, int], prefix: str, n: int) -> dict[str, Any]:
    c0 = {k: cpu_s(p) for k, p in pids.items()}
    rate = await _closed_loop(d, prefix, n, IN_FLIGHT)
    us = {k: round((cpu_s(p) - c0[k]) / n * 1e6, 1) for k, p in pids.items()}
    return {"chains_per_s": round(rate), "cpu_us_per_chain": us}


@benchmark("deadlines", (NAME,))
async def deadline_cost(ctx: Ctx) -> list[Figure]:
    """Router + nats-server CPU a chain with a 300 s deadline over without, deadlines piling up."""
    n = ctx.n("n", 8000, 1500)
    rounds = max(1, ctx.n("rounds", 4, 2))
    load_before = load_average()
    per_round: list[dict[str, Any]] = []
    async with one_pool("bench-deadlines") as stack:
        d = Driver(stack.bus)
        await d.start()
        await _closed_loop(d, "w-", 300, 16)  # warm: router and worker connected
        pids = {"router": stack.router.pid, "nats_server": stack.nats.pid or 0}
        for r in range(rounds):
            for deadline in (None, DEADLINE_MS):
                d.deadline_ms = deadline
                row = await _round(d, pids, f"r{r}-{deadline}-", n)
                row["deadlines_waiting"] = (r + (deadline is not None)) * n
                per_round.append({"round": r, "deadline_ms": deadline, **row})
        timers = await stack.bus.js.stream_info(stack.bus.topology.timers.name)

    def total(row: dict[str, Any]) -> float:
        return sum(row["cpu_us_per_chain"].values())

    last_with = next(r for r in reversed(per_round) if r["deadline_ms"] is not None)
    last_without = next(r for r in reversed(per_round) if r["deadline_ms"] is None)
    cond = {
        "N_per_round": n,
        "rounds": per_round,
        "in_flight": IN_FLIGHT,
        "deadline_ms": DEADLINE_MS,
        "deadlines_as_message_schedules": bool(timers.config.allow_msg_schedules),
        "process": "nats-server, router, worker, load sandbox and driver: five OS processes",
        "load_before": load_before,
        "load_after": load_average(),
    }
    return [
        Figure(
            NAME, round(total(last_with), 1), "us", "no_deadline_cpu_us_per_chain",
            round(total(last_without), 1), cond,
        )
    ]  # fmt: skip
