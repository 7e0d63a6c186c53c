"""Figures usage_report_s and top_first_screen_s: the operator views on a long event log.

The log is generated straight into the streams (realistic shapes, no router or worker): per
chain, three `step.completed` events (two LLM steps on two deployments, one tool), its
`chain.completed` with totals, step summaries and metadata, and its state in KV `cy_chains`
(one chain in fifty still running), over 20 tenants, all stamped today.

- usage_report_s: `chainyard usage`'s report (every tenant, --by tenant) over the whole log.
- top_first_screen_s: `chainyard top` from start to the first Snapshot: every heartbeat,
  breaker and chain state in KV, the event log from midnight, the pool consumers' info.

Baseline, in the same run: reading the same messages with an ordered consumer that does
nothing with them (the floor any reader of the log pays).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainState,
    LlmStep,
    Message,
    Output,
    StepCompleted,
    StepState,
    StepSummary,
    Target,
    ToolStep,
    Usage,
    encode,
    now_ms,
)
from chainyard.ordered import follow
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.top_feed import Sources
from chainyard.top_model import Feed
from chainyard.usage import report

from .calibrate import load_average
from .core import Ctx, Figure, benchmark

FIGURES = ("usage_report_s", "top_first_screen_s")
TENANTS = 20
TARGETS = (
    Target(deployment="fast-d", pool="fast", provider="openai", model="gpt-4o-mini"),
    Target(deployment="big-d", pool="big", provider="anthropic", model="claude-sonnet"),
    Target(deployment="tool.search", pool="tool.search", provider="tool", model="search"),
)


def _chain(cid: str, n: int) -> Chain:
    ask = [Message(role="user", content=f"question {n}: " + "lorem ipsum " * 20)]
    return Chain(
        id=cid,
        steps=[
            LlmStep(id="plan", model="small", messages=ask),
            ToolStep(id="search", tool="search", args={"query": "{{steps.plan.output}}"}),
            LlmStep(id="answer", model="big", messages=ask, after=["search"]),
        ],
        metadata={"feature": ("search", "summary", "chat")[n % 3], "user": f"u-{n % 997}"},
    )


def _messages(n: int, t: int) -> list[tuple[str, bytes]]:
    """One chain's events and its KV state, as (subject, payload)."""
    tenant, cid = f"tenant-{n % TENANTS}", f"chain-{n}"
    chain = _chain(cid, n)
    out: list[tuple[str, bytes]] = []
    steps: dict[str, StepState] = {}
    summaries = []
    for step, target in zip(("plan", "search", "answer"), TARGETS, strict=True):
        llm = target.provider != "tool"
        usage = Usage(input_tokens=120 + n % 50, output_tokens=40 + n % 30) if llm else Usage()
        cost = (usage.input_tokens * 0.15 + usage.output_tokens * 0.6) / 1e6
        ev = StepCompleted(
            chain_id=cid, step_id=step, attempt=1, tenant=tenant,
            output=Output(text="answer text " * 10 if llm else "", data=None if llm else [1, 2]),
            usage=usage, cost_usd=cost, target=target, worker=f"w-{n % 8}",
            dispatched_at_ms=t, started_at_ms=t + 1, latency_ms=180.0 + n % 400,
        )  # fmt: skip
        out.append((f"cy.events.{tenant}.{cid}.step.completed", encode(ev)))
        steps[step] = StepState(status="completed", attempt=1, target=target, output=ev.output,
                                usage=usage, cost_usd=cost, latency_ms=ev.latency_ms)  # fmt: skip
        summaries.append(
            StepSummary(
                step_id=step,
                status="completed",
                attempts=1,
                pool=target.pool,
                model=target.model,
                deployment=target.deployment,
                latency_ms=ev.latency_ms,
                usage=usage,
                cost_usd=cost,
            )
        )
    running = n % 50 == 0
    state = ChainState(chain=chain, tenant=tenant, steps=steps, created_at_ms=t,
                       status="running" if running else "completed")  # fmt: skip
    if not running:
        end = ChainCompleted(
            chain_id=cid, tenant=tenant, output=steps["answer"].output or Output(),
            usage=state.usage, cost_usd=state.cost_usd, duration_ms=900.0, steps=summaries,
            metadata=chain.metadata,
        )  # fmt: skip
        out.append((f"cy.events.{tenant}.{cid}.chain.completed", encode(end)))
    out.append((f"$KV.cy_chains.{tenant}.{cid}", encode(state)))
    return out


async def _fill(bus: Bus, chains: int) -> tuple[int, int, int]:
    """Publish the log (core publishes, then wait until the streams hold it all)."""
    t = now_ms()
    events = kv = size = 0
    for n in range(chains):
        for subject, data in _messages(n, t):
            await bus.nc.publish(subject, data)
            size += len(data)
            if subject.startswith("$KV"):
                kv += 1
            else:
                events += 1
        if n % 2000 == 0:
            await bus.nc.flush()
    await bus.nc.flush()
    topo = bus.topology
    for stream, want in ((topo.events.name, events), (f"KV_{topo.chains_kv.bucket}", kv)):
        deadline = time.monotonic() + 120
        while (await bus.js.stream_info(stream)).state.messages < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stream} never reached {want} messages")
            await asyncio.sleep(0.1)  # the server writes what it was sent; nothing to wait on
    return events, kv, size


async def _raw_read(bus: Bus, stream: str, subject: str, last_per_subject: bool) -> int:
    seen = 0

    def count(_msg: object) -> None:
        nonlocal seen
        seen += 1

    reader, done = await follow(
        bus.nc, bus.js, stream, subject, count, last_per_subject=last_per_subject,
        flow_control=True,
    )  # fmt: skip
    await asyncio.wait_for(done, 600)
    await reader.stop()
    return seen


@benchmark("ops_views", FIGURES)
async def ops_views(ctx: Ctx) -> list[Figure]:
    """`chainyard usage` and `chainyard top`'s first screen on a log of 100,000 chains."""
    chains = ctx.n("chains", 100_000, 5_000)
    load_before = load_average()
    async with NatsServer() as server:
        bus = await open_bus(server.url, name="bench-ops")
        try:
            t0 = time.perf_counter()
            events, kv, size = await _fill(bus, chains)
            fill_s = time.perf_counter() - t0
            topo = bus.topology

            t0 = time.perf_counter()
            raw_events = await _raw_read(bus, topo.events.name, topo.subjects.all_events, False)
            raw_events_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            rep = await report(bus.nc, by="tenant")
            usage_s = time.perf_counter() - t0
            assert rep.total.chains == events - 3 * chains, rep.total

            t0 = time.perf_counter()
            raw_kv = await _raw_read(
                bus, f"KV_{topo.chains_kv.bucket}", f"$KV.{topo.chains_kv.bucket}.>", True
            )
            raw_both_s = raw_events_s + time.perf_counter() - t0

            feed = Feed()
            sources = Sources(bus.nc, feed, topo)
            t0 = time.perf_counter()
            midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            await asyncio.wait_for(await sources.start(since=midnight), 600)
            snap = feed.snapshot(now_ms())
            top_s = time.perf_counter() - t0
            await sources.stop()
            running = sum(t.running for t in snap.tenants)
            assert running == len(range(0, chains, 50)) and snap.events == events, snap.events
        finally:
            await bus.close()
    conditions = {
        "chains": chains,
        "tenants": TENANTS,
        "events": events,
        "kv_chain_states": kv,
        "raw_events_read": raw_events,
        "raw_kv_read": raw_kv,
        "log_mb": round(size / 1e6, 1),
        "fill_s": round(fill_s, 1),
        "usage_rows": len(rep.rows),
        "top_running_chains": running,
        "server": "one local nats-server (file store), same machine",
        "baseline": "an ordered consumer reading the same messages and doing nothing",
        "load_before": load_before,
        "load_after": load_average(),
    }
    return [
        Figure("usage_report_s", usage_s, "s", "raw_read_events_s", raw_events_s, conditions),
        Figure(
            "top_first_screen_s", top_s, "s", "raw_read_events_and_kv_s", raw_both_s, conditions
        ),
    ]
