"""Figures tracing_overhead_ratio and tracing_overhead_ratio_sampled: tracing on vs off.

One embedded nats-server, Router + Worker(NullProvider) in one process (bench.chainyard_path),
the same driver as nats_path. Tracing on = what `tracing.setup` installs in a service
(`tracing.build_provider`: the OpenTelemetry SDK's TracerProvider with a BatchSpanProcessor and
the OTLP/HTTP exporter, configured by the `OTEL_*` variables), sending to a local OTLP receiver
in another process (tests/otlp_receiver.py); off = no tracer (what a service gets with no
exporter and no endpoint configured). Two tracing setups are measured:

- `tracing_overhead_ratio`: the SDK's default sampler (parent-based always-on: every chain
  traced). Goal >= 0.6.
- `tracing_overhead_ratio_sampled`: `OTEL_TRACES_SAMPLER=parentbased_traceidratio`,
  `OTEL_TRACES_SAMPLER_ARG=0.1` (one chain in ten traced, the rest carry an unsampled
  context). Goal >= 0.9.

Rounds alternate off / on / sampled in the same run; each figure is the median on-round
throughput over the median off-round throughput. The conditions carry this process's CPU per
chain in each kind of round (all threads: the SDK's export thread included), the spans
recorded per chain, and the spans the receiver got (the rest were dropped by the
BatchSpanProcessor's full queue, `OTEL_BSP_MAX_QUEUE_SIZE`, as the SDK does under overload),
and how the tracing CPU splits between the event loop's thread and the others (the SDK's
export thread: the OTLP encoder and the POST).

A fourth kind of round, `floor`, measures what the sampled figure would be with a middleware
that cost nothing: tracing off in chainyard, and the driver, once a chain, making exactly the
SDK calls a chain at 0.1 needs and nothing of chainyard's (`_SdkFloor`): the sampler's
decision, the chain's context, `inject`, the worker's `extract`, their attaches, a contextvar a
hop, and for a sampled chain the two spans with the attributes chainyard gives them. Its ratio
is in the sampled figure's conditions (`sdk_floor_ratio`); the messages carry no `traceparent`
in those rounds (docs/BENCH.md, fifth pass: that header costs CPU, not measurable throughput).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import statistics
import sys
import time
from typing import Any

import httpx
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from chainyard.runtime import tracing
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

from .calibrate import load_average
from .chainyard_path import MODEL, POOL, TENANT, ChainyardPath
from .core import HERE, Ctx, Figure, benchmark
from .drive import Completions, Run, drive

NAME = "tracing_overhead_ratio"
SAMPLED = "tracing_overhead_ratio_sampled"
RATIO = "0.1"
RATIO_SAMPLER = {
    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    "OTEL_TRACES_SAMPLER_ARG": RATIO,
}


class _Count(SpanProcessor):
    """Counts the spans that end recorded (sampled): spans per chain."""

    def __init__(self) -> None:
        self.ended = 0

    def on_end(self, span: Any) -> None:
        self.ended += 1


async def _receiver() -> tuple[asyncio.subprocess.Process, str]:
    script = HERE.parent / "tests" / "otlp_receiver.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--discard", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc, line.decode().strip()


async def _received(endpoint: str) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{endpoint}/count")).json()["spans"]


def _provider(endpoint: str, **env: str) -> tuple[Any, _Count]:
    """What `tracing.setup` builds from these variables (and no other OTEL_* ones)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, **env)
    try:
        provider = tracing.build_provider("chainyard-bench")
    finally:
        for k in [k for k in os.environ if k.startswith("OTEL_")]:
            del os.environ[k]
        os.environ.update(saved)
    count = _Count()
    provider.add_span_processor(count)
    return provider, count


class _SdkFloor:
    """What one chain at 0.1 costs the SDK with a middleware that costs nothing: the calls a
    sampled-out chain needs under issue 16's rules (the SDK's sampler, propagators and context
    API, one trace per chain, the W3C context passed on) and a sampled chain's two spans
    (`chat` with its messaging and GenAI attributes, `chain` with its own, under the chain's
    ids), made by the driver in the same event loop, chainyard's tracing off."""

    def __init__(self, provider: TracerProvider) -> None:
        self.sampler = provider.sampler
        self.tracer = provider.get_tracer("chainyard-bench-floor")
        self.ids = RandomIdGenerator()
        self.scope: contextvars.ContextVar[str] = contextvars.ContextVar("bench_floor_scope")

    def chain(self) -> None:
        for hop in ("intake", "work", "step event"):  # a handler's scope a hop, at the least
            self.scope.reset(self.scope.set(hop))
        trace_id = self.ids.generate_trace_id()
        decision = self.sampler.should_sample(None, trace_id, "chain", SpanKind.INTERNAL)
        sampled = decision.decision.is_sampled()
        flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        sc = SpanContext(trace_id, self.ids.generate_span_id(), False, flags, decision.trace_state)
        chain_ctx = trace.set_span_in_context(NonRecordingSpan(sc), context.get_current())
        headers: dict[str, str] = {}
        propagate.inject(headers, context=chain_ctx)  # intake: what the assignment carries
        context.detach(context.attach(chain_ctx))
        work_ctx = propagate.extract(headers)  # the worker
        if not trace.get_current_span(work_ctx).get_span_context().trace_flags.sampled:
            context.detach(context.attach(work_ctx))
            return
        call = self.tracer.start_span(
            f"chat {MODEL}", context=work_ctx, kind=SpanKind.CLIENT, attributes=_CALL
        )
        call_ctx = trace.set_span_in_context(call)
        context.detach(context.attach(call_ctx))  # current while the call runs
        call.set_attributes(_CALL_DONE)
        propagate.inject({}, context=call_ctx)  # the step's event, produced by the call
        call.end()
        token = tracing.forced_ids.set((sc.trace_id, sc.span_id))  # the chain span's own ids
        try:
            span = self.tracer.start_span(
                "chain", context=context.Context(), kind=SpanKind.INTERNAL, attributes=_CHAIN
            )
        finally:
            tracing.forced_ids.reset(token)
        span.end()


# the attributes chainyard's call and chain spans carry here (genai, messaging, chain_trace)
_CALL = {
    "gen_ai.operation.name": "chat",
    "gen_ai.provider.name": "null",
    "gen_ai.request.model": MODEL,
    "chainyard.deployment": "null-a",
    "messaging.system": "nats",
    "messaging.operation.name": "process",
    "messaging.operation.type": "process",
    "messaging.destination.name": f"cy.work.{POOL}",
    "messaging.message.id": f"{TENANT}.k.s.1",
    "messaging.consumer.group.name": f"pool-{POOL}",
    "chainyard.route.reason": "only candidate",
}
_CALL_DONE = {
    "gen_ai.response.model": MODEL,
    "gen_ai.usage.input_tokens": 1,
    "gen_ai.usage.output_tokens": 1,
    "gen_ai.response.finish_reasons": ["stop"],
    "chainyard.cost_usd": 0.0,
}
_CHAIN = {
    "chainyard.tenant": TENANT,
    "chainyard.chain.id": "k",
    "chainyard.chain.outcome": "completed",
    "chainyard.chain.cost_usd": 0.0,
    "chainyard.chain.input_tokens": 1,
    "chainyard.chain.output_tokens": 1,
    "chainyard.chain.steps": 1,
    "chainyard.chain.attempts": 1,
}


@benchmark("tracing", (NAME, SAMPLED))
async def tracing_overhead(ctx: Ctx) -> list[Figure]:
    """Single-step chains/s with spans exported over OTLP/HTTP (all, and 1 in 10) vs off."""
    n = ctx.n("n", 3000, 400)
    window = ctx.n("window", 256, 256)
    warm = ctx.n("warmup", 300, 100)
    rounds = max(1, ctx.n("rounds", 5, 2))
    tmo = 60 + n / 20
    load_before = load_average()
    recv, endpoint = await _receiver()
    full, full_count = _provider(endpoint)
    sampled, sampled_count = _provider(endpoint, **RATIO_SAMPLER)
    floor_provider, floor_count = _provider(endpoint, **RATIO_SAMPLER)
    floor = _SdkFloor(floor_provider)
    # chainyard's tracer in each kind of round (None: tracing off), and the provider whose
    # spans the round exports (flushed and counted after it)
    kinds: dict[str, Any] = {"off": None, "on": full, "sampled": sampled, "floor": None}
    exported: dict[str, tuple[TracerProvider, _Count]] = {
        "on": (full, full_count),
        "sampled": (sampled, sampled_count),
        "floor": (floor_provider, floor_count),
    }
    runs: dict[str, list[Run]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # this process's CPU per chain, us
    loop_cpu: dict[str, list[float]] = {k: [] for k in kinds}  # the event loop's thread only
    counted: dict[str, int] = {k: 0 for k in exported}  # spans ended recorded
    received: dict[str, int] = {k: 0 for k in exported}  # spans the receiver got
    seen = 0
    try:
        async with NatsServer() as server:
            bus = await open_bus(server.url, name="bench-tracing")
            done = Completions()
            cy = ChainyardPath(bus, done, worker_slots=window, router_concurrency=window)

            async def floor_submit(key: str) -> None:
                floor.chain()
                await cy.submit(key)

            try:
                await cy.start()
                for kind, provider in kinds.items():  # warm every path
                    if provider is not None:
                        tracing.enable(provider, capture=False)
                    keys = [f"w{kind}-{i}" for i in range(warm)]
                    await drive(
                        keys, floor_submit if kind == "floor" else cy.submit, done, window, tmo
                    )
                    tracing.disable()
                    if kind in exported:
                        await asyncio.to_thread(exported[kind][0].force_flush)
                cy.check_alive()
                seen = await _received(endpoint)
                for r in range(rounds):
                    for kind, provider in kinds.items():
                        export = exported.get(kind)
                        before = export[1].ended if export is not None else 0
                        if provider is not None:
                            tracing.enable(provider, capture=False)
                        submit = floor_submit if kind == "floor" else cy.submit
                        c0, t0 = time.process_time(), time.thread_time()
                        keys = [f"{kind}{r}-{i}" for i in range(n)]
                        runs[kind].append(await drive(keys, submit, done, window, tmo))
                        tracing.disable()
                        if export is not None:  # no export left for the next round
                            await asyncio.to_thread(export[0].force_flush)
                            counted[kind] += export[1].ended - before
                            now = await _received(endpoint)
                            received[kind] += now - seen
                            seen = now
                        cpu[kind].append((time.process_time() - c0) / n * 1e6)
                        loop_cpu[kind].append((time.thread_time() - t0) / n * 1e6)
                if ctx.profile:  # an extra on round: where the tracing cost goes
                    tracing.enable(full, capture=False)
                    with ctx.profiled("tracing_on"):
                        await drive([f"prof-{i}" for i in range(n)], cy.submit, done, window, tmo)
                    tracing.disable()
            finally:
                tracing.disable()
                await cy.stop()
                await bus.close()
    finally:
        for p in (full, sampled, floor_provider):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(p.shutdown)
        recv.terminate()
        await recv.wait()

    off_tp = statistics.median(r.per_s for r in runs["off"])
    cpu_off = statistics.median(cpu["off"])
    common: dict[str, Any] = {
        "N": n,
        "in_flight_window": window,
        "rounds": rounds,
        "warmup": warm,
        "process": "driver, router and worker in one process, one connection; receiver apart",
        "provider": "NullProvider (instant, in process)",
        "tracer": "OpenTelemetry SDK TracerProvider + BatchSpanProcessor + OTLPSpanExporter "
        "(OTLP/HTTP protobuf), built by tracing.build_provider from OTEL_* variables",
        "batch": "OTEL_BSP_* defaults (512 a batch, 5 s delay, 2048 queue)",
        "receiver": "local process, counts spans, keeps none (tests/otlp_receiver.py --discard)",
        "off_rounds_per_s": [round(r.per_s, 1) for r in runs["off"]],
        "cpu_us_per_chain_off": round(cpu_off, 1),
        "off_p50_ms": round(statistics.median(r.pct(50) for r in runs["off"]), 3),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    figures = []
    for kind, name, sampler, goal in (
        ("on", NAME, "parentbased_always_on (the SDK's default: every chain traced)", ">= 0.6"),
        (
            "sampled",
            SAMPLED,
            f"parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG={RATIO}",
            ">= 0.9",
        ),
    ):
        tp = statistics.median(r.per_s for r in runs[kind])
        cpu_on = statistics.median(cpu[kind])
        loop_on, loop_off = statistics.median(loop_cpu[kind]), statistics.median(loop_cpu["off"])
        chains = n * rounds
        per_chain = counted[kind] / chains  # made and recorded (sampled)
        cond = {
            **common,
            "sampler": sampler,
            "spans_per_chain": round(per_chain, 2),
            "spans_exported_per_chain": round(received[kind] / chains, 2),
            "spans_dropped": counted[kind] - received[kind],
            "on_rounds_per_s": [round(r.per_s, 1) for r in runs[kind]],
            "cpu_us_per_chain_on": round(cpu_on, 1),
            "tracing_cpu_us_per_chain": round(cpu_on - cpu_off, 1),
            "tracing_cpu_us_per_chain_event_loop": round(loop_on - loop_off, 1),
            "tracing_cpu_us_per_chain_other_threads": round(
                cpu_on - loop_on - cpu_off + loop_off, 1
            ),
            "tracing_cpu_us_per_exported_span": round((cpu_on - cpu_off) / max(0.01, per_chain), 1),
            "on_p50_ms": round(statistics.median(r.pct(50) for r in runs[kind]), 3),
            "goal": goal,
        }
        if kind == "sampled":  # what this figure would be with a middleware that cost nothing
            cond["sdk_floor_ratio"] = round(
                statistics.median(r.per_s for r in runs["floor"]) / off_tp, 3
            )
            cond["sdk_floor_cpu_us_per_chain"] = round(statistics.median(cpu["floor"]) - cpu_off, 1)
            cond["sdk_floor_rounds_per_s"] = [round(r.per_s, 1) for r in runs["floor"]]
            cond["sdk_floor_spans_per_chain"] = round(counted["floor"] / chains, 2)
        figures.append(Figure(name, tp, "steps/s", "tracing_off_steps_per_s", off_tp, cond))
    return figures
