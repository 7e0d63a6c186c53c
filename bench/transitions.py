"""Figures step_transition_p50_ms / _p99_ms: result event published -> next step's assignment.

Two-step chains (a -> b) run through Router + Worker(NullProvider) at half of the measured
saturation (an open loop, so the figure is the path, not the queue of a saturated system). Core
subscriptions in the same process see step a's `step.completed` event and step b's assignment
on `cy.work.<pool>` as they are published; the transition is the time between the two, the
router's whole share of a step: fetch the event, decide, compare-and-set, publish the next step.
Baseline, in the same run: a bare JetStream round trip (publish -> PubAck) on the same server.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from nats.aio.msg import Msg

from chainyard.contracts import Chain, LlmStep, Message, encode
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer

from .calibrate import load_average
from .chainyard_path import MODEL, POOL, TENANT, ChainyardPath
from .core import Ctx, Figure, benchmark
from .drive import Completions, Run, drive

FIGURES = ("step_transition_p50_ms", "step_transition_p99_ms")


def two_step_chain(key: str) -> Chain:
    ask = [Message(role="user", content="hi")]
    return Chain(
        id=key,
        steps=[
            LlmStep(id="a", model=MODEL, messages=ask),
            LlmStep(id="b", model=MODEL, messages=ask, after=["a"]),
        ],
    )


async def _bare_roundtrips(bus: Bus, n: int) -> Run:
    await bus.js.add_stream(name="BENCH_RT", subjects=["bench.rt"])
    lat: list[float] = []
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        await bus.publisher.publish("bench.rt", b"x" * 200, headers={"Nats-Msg-Id": f"rt-{i}"})
        lat.append((time.perf_counter() - t0) * 1000)
    return Run(n=n, window=1, elapsed_s=time.perf_counter() - t_all, latencies_ms=lat)


@benchmark("step_transition", FIGURES)
async def step_transition(ctx: Ctx) -> list[Figure]:
    """Router transition latency at half of saturation vs a bare JetStream publish round trip."""
    n = ctx.n("n", 2000, 400)
    window = ctx.n("window", 64, 32)
    load_before = load_average()
    event_at: dict[str, float] = {}
    transitions: list[float] = []
    async with NatsServer() as server:
        bus = await open_bus(server.url, name="bench-transitions")
        done = Completions()
        cy = ChainyardPath(bus, done, worker_slots=window, router_concurrency=window)
        prefix = f"{bus.subjects.prefix}.events.{TENANT}."

        async def on_event(msg: Msg) -> None:
            chain, _, rest = msg.subject[len(prefix) :].partition(".")
            if rest == "step.completed" and b'"step_id":"a"' in msg.data:
                event_at[chain] = time.perf_counter()

        async def on_work(msg: Msg) -> None:
            _, _, rest = (msg.headers or {}).get("Nats-Msg-Id", "").partition(".")  # <tenant>.
            chain, _, step = rest.partition(".")
            if step.startswith("b.") and chain in event_at:
                transitions.append((time.perf_counter() - event_at.pop(chain)) * 1000)

        subs = [
            await bus.nc.subscribe(f"{prefix}*.step.completed", cb=on_event),
            await bus.nc.subscribe(bus.subjects.work(POOL), cb=on_work),
        ]

        async def submit(key: str) -> None:
            await bus.publisher.publish(
                bus.subjects.submit(TENANT),
                encode(two_step_chain(key)),
                headers={"Nats-Msg-Id": key},
            )

        try:
            await cy.start()
            await drive([f"tw-{i}" for i in range(100)], submit, done, window, 60)
            # Saturation first (closed loop), then an open loop at half of it: "under load",
            # without measuring the queue a saturated system builds.
            sat = await drive([f"ts-{i}" for i in range(n)], submit, done, window, 60 + n / 20)
            rate = sat.per_s / 2
            rounds: list[Run] = []
            for r in range(ctx.n("rounds", 5, 1)):
                transitions.clear()
                keys = [f"t{r}-{i}" for i in range(n)]
                done.arm(keys, len(keys))
                start = time.perf_counter()
                for i, key in enumerate(keys):
                    if (wait := start + i / rate - time.perf_counter()) > 0:
                        await asyncio.sleep(wait)  # pacing the offered load, not a race
                    done.started[key] = time.perf_counter()
                    await submit(key)
                await done.wait_all(60 + n / 20)
                cy.check_alive()
                elapsed = time.perf_counter() - start
                rounds.append(Run(len(transitions), 0, elapsed, list(transitions)))
            bare = await _bare_roundtrips(bus, ctx.n("baseline_n", 500, 200))
        finally:
            for s in subs:
                await s.unsubscribe()
            await cy.stop()
            await bus.close()
    conditions = {
        "chains": n,
        "saturation_chains_per_s": round(sat.per_s, 1),
        "offered_chains_per_s": round(rate, 1),
        "rounds": len(rounds),
        "statistic": "median over rounds of each round's percentile",
        "rounds_p50_ms": [round(r.pct(50), 3) for r in rounds],
        "rounds_p99_ms": [round(r.pct(99), 3) for r in rounds],
        "transitions_measured": sum(r.n for r in rounds),
        "provider": "in-process null provider",
        "baseline": "sequential publish -> PubAck, the publisher the router uses, same server",
        "load_before": load_before,
        "load_after": load_average(),
    }
    return [
        Figure(
            "step_transition_p50_ms",
            statistics.median(r.pct(50) for r in rounds),
            "ms",
            "jetstream_roundtrip_p50_ms",
            bare.pct(50),
            conditions,
        ),
        Figure(
            "step_transition_p99_ms",
            statistics.median(r.pct(99) for r in rounds),
            "ms",
            "jetstream_roundtrip_p99_ms",
            bare.pct(99),
            conditions,
        ),
    ]
