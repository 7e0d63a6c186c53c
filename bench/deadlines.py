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

A third kind of round gives figure deadline_ended_cpu_ratio: chains with a 1 s deadline, which
each reaches only after it ended, measured until every deadline of the round is gone from the
timers stream (removed when its chain ended, or fired and handled), over rounds without a
deadline measured the same way. This is the deadline every gateway request pays in a service
that runs longer than the 300 s rounds above show: the deadline comes after the chain ended.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chainyard.runtime.nats import Bus

from .added_latency import Driver, _closed_loop, one_pool
from .calibrate import load_average
from .core import Ctx, Figure, benchmark
from .workers import cpu_s

NAME = "deadline_cpu_ratio"
ENDED = "deadline_ended_cpu_ratio"
DEADLINE_MS = 300_000  # the gateway's default: no chain here reaches it
ENDS_FIRST_MS = 1_000  # reached by every chain's deadline within the round's measurement
IN_FLIGHT = 32


async def _timers_clear(bus: Bus, within_s: float = 30.0) -> None:
    """Until the timers stream holds nothing: every deadline schedule removed, or fired and
    handled (a roll-up that removed one expires after a second)."""
    give_up = time.monotonic() + within_s
    while (await bus.js.stream_info(bus.topology.timers.name)).state.messages:
        if time.monotonic() > give_up:
            raise TimeoutError(f"deadlines still in the timers stream after {within_s} s")
        await asyncio.sleep(0.05)  # polling the stream's state for the event above


async def _round(
    d: Driver, pids: dict[str, int], prefix: str, n: int, *, until_due: bool = False
) -> dict[str, Any]:
    """`until_due`: CPU counted until the round's deadlines are all due and gone."""
    c0 = {k: cpu_s(p) for k, p in pids.items()}
    rate = await _closed_loop(d, prefix, n, IN_FLIGHT)
    if until_due:
        await asyncio.sleep((d.deadline_ms or 0) / 1000)  # the last chain's deadline is due
        await _timers_clear(d.bus)
    us = {k: round((cpu_s(p) - c0[k]) / n * 1e6, 1) for k, p in pids.items()}
    return {"chains_per_s": round(rate), "cpu_us_per_chain": us}


@benchmark("deadlines", (NAME, ENDED))
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
        # First the deadlines every chain outlives, each round counted until they are due and
        # gone (so while the timers stream starts empty); then the 300 s ones piling up.
        ended_rounds: list[dict[str, Any]] = []
        for r in range(rounds):
            for deadline in (None, ENDS_FIRST_MS):
                d.deadline_ms = deadline
                row = await _round(d, pids, f"e{r}-{deadline}-", n, until_due=True)
                ended_rounds.append({"round": r, "deadline_ms": deadline, **row})
        for r in range(rounds):
            for deadline in (None, DEADLINE_MS):
                d.deadline_ms = deadline
                row = await _round(d, pids, f"r{r}-{deadline}-", n)
                row["deadlines_waiting"] = (r + (deadline is not None)) * n
                per_round.append({"round": r, "deadline_ms": deadline, **row})
        timers = await stack.bus.js.stream_info(stack.bus.topology.timers.name)

    def total(row: dict[str, Any]) -> float:
        return sum(row["cpu_us_per_chain"].values())

    def last(rows: list[dict[str, Any]], with_deadline: bool) -> dict[str, Any]:
        return next(r for r in reversed(rows) if (r["deadline_ms"] is not None) == with_deadline)

    last_with, last_without = last(per_round, True), last(per_round, False)
    ended_with, ended_without = last(ended_rounds, True), last(ended_rounds, False)
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
    ended_cond = {
        **cond,
        "rounds": ended_rounds,
        "deadline_ms": ENDS_FIRST_MS,
        "measured": "each round until its last deadline is due and the timers stream is empty",
    }
    return [
        Figure(
            NAME, round(total(last_with), 1), "us", "no_deadline_cpu_us_per_chain",
            round(total(last_without), 1), cond,
        ),
        Figure(
            ENDED, round(total(ended_with), 1), "us", "no_deadline_cpu_us_per_chain",
            round(total(ended_without), 1), ended_cond,
        ),
    ]  # fmt: skip
