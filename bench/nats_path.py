"""Figure nats_path_vs_raw_jetstream (+ chain latency): chainyard's path against raw JetStream.

One embedded nats-server, one process, one connection, one event loop. Both sides get the same
driver (bench.drive): N keys, a fixed in-flight window, completion seen by a core subscription.
Both systems are up for the whole run; after a warm-up each, the measured runs alternate
raw / chainyard for `rounds` rounds, so drift in machine load hits both sides alike. Throughput
is the median round; latencies pool every round's samples.
"""

from __future__ import annotations

import statistics
from typing import Any

from chainyard.contracts import encode
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

from .calibrate import calibrate, load_average
from .chainyard_path import ChainyardPath, one_step_chain
from .core import Ctx, Figure, benchmark
from .drive import Completions, Run, drive
from .raw_jetstream import RawLoop

NAME = "nats_path_vs_raw_jetstream"
FIGURES = (NAME, "chain_latency_p50_ms", "chain_latency_p99_ms")


def keys(tag: str, n: int) -> list[str]:
    return [f"{tag}-{i:07d}" for i in range(n)]


def pooled(runs: list[Run]) -> Run:
    return Run(
        n=sum(r.n for r in runs),
        window=runs[0].window,
        elapsed_s=sum(r.elapsed_s for r in runs),
        latencies_ms=[x for r in runs for x in r.latencies_ms],
    )


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.per_s)[len(runs) // 2]


@benchmark(NAME, FIGURES)
async def nats_path_vs_raw_jetstream(ctx: Ctx) -> list[Figure]:
    """Single-step chains/s through Router + Worker(NullProvider) vs a raw JetStream worker loop."""
    n = ctx.n("n", 5000, 500)
    window = ctx.n("window", 256, 256)
    lat_n = ctx.n("latency_n", 300, 60)
    warm = ctx.n("warmup", 300, 100)
    rounds = max(1, ctx.n("rounds", 3, 1))
    tmo = 60 + n / 50
    payload = encode(one_step_chain(keys("rt", 1)[0]))
    result = b"r" * 400
    load_before = load_average()
    raw_tp: list[Run] = []
    cy_tp: list[Run] = []
    raw_lat: list[Run] = []
    cy_lat: list[Run] = []

    async with NatsServer() as server:
        calibration = await calibrate(server.url)
        bus = await open_bus(server.url, name="bench")
        raw_done, cy_done = Completions(), Completions()
        raw = RawLoop(bus.nc, bus.js, raw_done, slots=window, payload=payload, result=result)
        cy = ChainyardPath(bus, cy_done, worker_slots=window, router_concurrency=window)
        try:
            await raw.start()
            await cy.start()
            await drive(keys("rw", warm), raw.submit, raw_done, window, tmo)
            await drive(keys("cw", warm), cy.submit, cy_done, window, tmo)
            cy.check_alive()
            for r in range(rounds):
                raw_tp.append(await drive(keys(f"rt{r}", n), raw.submit, raw_done, window, tmo))
                cy_tp.append(await drive(keys(f"ct{r}", n), cy.submit, cy_done, window, tmo))
                per = max(1, lat_n // rounds)
                raw_lat.append(await drive(keys(f"rl{r}", per), raw.submit, raw_done, 1, tmo))
                cy_lat.append(await drive(keys(f"cl{r}", per), cy.submit, cy_done, 1, tmo))
            if ctx.profile:  # a separate run: the profiler's overhead stays out of the figures
                with ctx.profiled("chainyard_path_throughput"):
                    await drive(keys("cp", n), cy.submit, cy_done, window, tmo)
        finally:
            try:
                await cy.stop()
                await raw.stop()
            finally:
                await bus.close()

    raw_mid, cy_mid = median_run(raw_tp), median_run(cy_tp)
    raw_l, cy_l = pooled(raw_lat), pooled(cy_lat)
    common: dict[str, Any] = {
        "server": "embedded nats-server, JetStream file storage, R1, default sync_interval",
        "process": "driver, router, worker and raw loop in one process, one connection",
        "provider": "NullProvider (instant, in process)",
        "rounds": rounds,
        "warmup": warm,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **calibration,
        "raw_work_payload_bytes": len(payload),
        "raw_result_payload_bytes": len(result),
        "raw_loop": "fetch(batch=free) -> publish result, await PubAck -> ack; Nats-Msg-Id on both",
        "submit": "js.publish per key with Nats-Msg-Id, awaited PubAck, one task per key",
    }
    tp_cond = {
        **common,
        "N": n,
        "concurrency": window,
        "in_flight_window": window,
        "raw_worker_slots": window,
        "worker_slots": window,
        "router_concurrency": window,
        "statistic": "median round by throughput",
        "raw": raw_mid.summary(),
        "chainyard": cy_mid.summary(),
        "raw_rounds_per_s": [round(r.per_s, 1) for r in raw_tp],
        "chainyard_rounds_per_s": [round(r.per_s, 1) for r in cy_tp],
        "ratio_spread": _ratio_spread(cy_tp, raw_tp),
    }
    lat_cond = {
        **common,
        "N": cy_l.n,
        "concurrency": 1,
        "in_flight_window": 1,
        "measured": "submit publish start -> completion event received, all rounds pooled",
        "raw": raw_l.summary(),
        "chainyard": cy_l.summary(),
    }
    return [
        Figure(NAME, cy_mid.per_s, "steps/s", "raw_jetstream_steps_per_s", raw_mid.per_s, tp_cond),
        _latency("chain_latency_p50_ms", 50, cy_l, raw_l, lat_cond),
        _latency("chain_latency_p99_ms", 99, cy_l, raw_l, lat_cond),
    ]


def _ratio_spread(cy: list[Run], raw: list[Run]) -> dict[str, float]:
    ratios = [c.per_s / r.per_s for c, r in zip(cy, raw, strict=True)]
    return {
        "min": round(min(ratios), 4),
        "median": round(statistics.median(ratios), 4),
        "max": round(max(ratios), 4),
    }


def _latency(name: str, p: int, cy: Run, raw: Run, conditions: dict[str, Any]) -> Figure:
    return Figure(name, cy.pct(p), "ms", f"raw_jetstream_roundtrip_p{p}_ms", raw.pct(p), conditions)
