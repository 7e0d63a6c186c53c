"""Machine yardsticks measured on the bench's own server, so figures from two machines compare.

NATS-NOTES.md's reference machine (2 cores, uvloop): core pub/sub ~250k msg/s, JetStream
publish awaited one at a time ~0.1-0.2 ms per round trip.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import nats


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


async def calibrate(url: str, *, pubsub_n: int = 50_000, js_n: int = 1_000) -> dict[str, Any]:
    """Core pub/sub msg/s (one connection, 100 B) and sequential JetStream publishes/s."""
    nc = await nats.connect(url, name="bench-calibrate")
    try:
        got = 0
        all_in = asyncio.Event()

        async def on_msg(_: Any) -> None:
            nonlocal got
            got += 1
            if got == pubsub_n:
                all_in.set()

        sub = await nc.subscribe("bench.cal.core", cb=on_msg)
        await nc.flush()
        body = b"x" * 100
        t0 = time.perf_counter()
        for _ in range(pubsub_n):
            await nc.publish("bench.cal.core", body)
        await asyncio.wait_for(all_in.wait(), 60)
        core = pubsub_n / (time.perf_counter() - t0)
        await sub.unsubscribe()

        js = nc.jetstream()
        await js.add_stream(name="BENCH_CAL", subjects=["bench.cal.js"])
        t0 = time.perf_counter()
        for _ in range(js_n):
            await js.publish("bench.cal.js", body)
        js_rate = js_n / (time.perf_counter() - t0)
        await js.delete_stream("BENCH_CAL")
    finally:
        await nc.close()
    return {
        "calibration_core_pubsub_msgs_per_s": round(core),
        "calibration_js_publish_sequential_per_s": round(js_rate),
    }
