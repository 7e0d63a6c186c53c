"""Figure kept_chain_server_bytes: the memory nats-server holds for each chain it keeps.

Every chain leaves subjects of its own in the streams for as long as they are kept: its events
(`cy.events.<tenant>.<chain>.<kind>`, `CY_EVENTS`, 7 days) and its state (KV `cy_chains`, key
`<tenant>.<chain>`, `ended_chain_ttl_s` after it ended, 7 days by default). nats-server keeps an
index entry in memory for every subject a file-store stream holds, so its memory grows with the
chains kept, not with the chains running: this figure is what sizes its memory limit
(docs/OPERATIONS.md, "How long chains are kept").

One-step chains run through nats-server, `chainyard router` and `chainyard worker` (each its
own process, bench.added_latency's stack), then nats-server's heap in use is read from its
profiling endpoint after a garbage collection (`/debug/pprof/heap?gc=1`) once it has settled:
the file store keeps recently written blocks and their per-subject state in memory for a while
(a minute or two), which a chain kept for days no longer costs, so the heap is read every 10 s
until it falls by less than 5% of what the chains added (at most `settle_s`). Its resident
size is in the conditions. Baseline, in the same run: the same number of messages, of the same
sizes, published to one subject per stream of another nats-server, read the same way: what
keeping the messages costs without a subject per chain.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from contextlib import AsyncExitStack
from typing import Any

import nats
from nats.js.api import StreamConfig

from chainyard.runtime.nats import Bus
from chainyard.runtime.server import NatsServer

from .added_latency import Driver, _closed_loop, one_pool
from .calibrate import load_average
from .core import Ctx, Figure, benchmark
from .gateways import free_port
from .workers import rss_mb

NAME = "kept_chain_server_bytes"
IN_FLIGHT = 32
_HEAP_IN_USE = re.compile(r"# HeapInuse = (\d+)")
SETTLE_EVERY_S = 10.0


def _heap_bytes(port: int) -> int:
    """nats-server's Go heap in use, after a collection (its pprof endpoint)."""
    url = f"http://127.0.0.1:{port}/debug/pprof/heap?debug=1&gc=1"
    with urllib.request.urlopen(url, timeout=60) as r:
        found = _HEAP_IN_USE.search(r.read().decode())
    if found is None:
        raise RuntimeError("nats-server's heap profile has no HeapInuse")
    return int(found[1])


async def _settled_heap_bytes(port: int, before: int, within_s: float) -> int:
    """The heap once the file store has let go of its caches: read every SETTLE_EVERY_S until
    it falls by less than 5% of what was added since `before`, or `within_s` is spent."""
    last = _heap_bytes(port)
    for _ in range(int(within_s // SETTLE_EVERY_S)):
        await asyncio.sleep(SETTLE_EVERY_S)  # the caches expire on the server's own timers
        now = _heap_bytes(port)
        if last - now < 0.05 * max(last - before, 1):
            return now
        last = now
    return last


async def _kept_messages(bus: Bus) -> list[tuple[str, int, int]]:
    """(stream, messages, bytes) of each stream that keeps a chain's messages."""
    out = []
    for name in (bus.topology.events.name, f"KV_{bus.topology.chains_kv.bucket}"):
        state = (await bus.js.stream_info(name)).state
        out.append((name, state.messages, state.bytes))
    return out


async def _chains(n: int, settle_s: float) -> dict[str, Any]:
    port = free_port()
    async with one_pool("bench-retention", ["--profile", str(port)]) as stack:
        d = Driver(stack.bus)
        await d.start()
        await _closed_loop(d, "w-", 300, 16)  # warm: connections, buffers, first blocks
        heap0, rss0 = _heap_bytes(port), rss_mb(stack.nats.pid or 0) * 2**20
        kept0 = await _kept_messages(stack.bus)
        await _closed_loop(d, "kept-", n, IN_FLIGHT)
        kept = await _kept_messages(stack.bus)
        heap = await _settled_heap_bytes(port, heap0, settle_s)
        rss = rss_mb(stack.nats.pid or 0) * 2**20
    grew = [(s, m - m0, b - b0) for (s, m, b), (_, m0, b0) in zip(kept, kept0, strict=True)]
    return {"heap": heap - heap0, "rss": rss - rss0, "streams": grew}


async def _shared_subjects(streams: list[tuple[str, int, int]], settle_s: float) -> int:
    """The heap the same messages take on one subject per stream (another nats-server)."""
    port = free_port()
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(NatsServer(extra_args=["--profile", str(port)]))
        nc = await nats.connect(server.url)
        stack.push_async_callback(nc.close)
        js = nc.jetstream()
        heap0 = _heap_bytes(port)
        for i, (_, messages, size) in enumerate(streams):
            await js.add_stream(StreamConfig(name=f"S{i}", subjects=[f"s{i}.>"]))
            payload = b"x" * max(0, size // max(messages, 1) - 60)  # less the stored overhead
            for k in range(messages - 1):
                await nc.publish(f"s{i}.one", payload)
                if k % 2000 == 1999:
                    await nc.flush()
            # the last one acknowledged: the stream stores one connection's messages in order
            await js.publish(f"s{i}.one", payload)
        return await _settled_heap_bytes(port, heap0, settle_s) - heap0


@benchmark("retention", (NAME,))
async def kept_chain_memory(ctx: Ctx) -> list[Figure]:
    """nats-server heap per kept one-step chain vs the same messages on shared subjects."""
    n = ctx.n("n", 30_000, 3_000)
    settle_s = ctx.n("settle_s", 240, 20)
    load_before = load_average()
    chains = await _chains(n, settle_s)
    shared = await _shared_subjects(chains["streams"], settle_s)
    cond = {
        "chains": n,
        "in_flight": IN_FLIGHT,
        "kept_per_chain": {s: round(m / n, 2) for s, m, _ in chains["streams"]},
        "stored_bytes_per_chain": round(sum(b for _, _, b in chains["streams"]) / n),
        "rss_bytes_per_chain": round(chains["rss"] / n),
        "measured": "nats-server HeapInuse after a GC (pprof), before the chains and once settled",
        "settle_s_at_most": settle_s,
        "process": "nats-server, router, worker, load sandbox and driver: five OS processes",
        "load_before": load_before,
        "load_after": load_average(),
    }
    return [
        Figure(
            NAME, round(chains["heap"] / n), "B", "shared_subject_server_bytes",
            round(shared / n), cond,
        )
    ]  # fmt: skip
