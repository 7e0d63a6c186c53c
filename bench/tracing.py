"""Figure tracing_overhead_ratio: the chainyard path with tracing exported vs tracing off.

One embedded nats-server, Router + Worker(NullProvider) in one process (bench.chainyard_path),
the same driver as nats_path. Tracing on = an SDK TracerProvider with the BatchSpanProcessor
and the OTLP/HTTP exporter sending to a local OTLP receiver in another process
(tests/otlp_receiver.py); off = chainyard's helpers with no tracer (what a service gets with no
OTEL_EXPORTER_OTLP_ENDPOINT). Rounds alternate off / on in the same run; the figure is the
median on-round throughput over the median off-round throughput (goal >= 0.85).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
from typing import Any

from chainyard.runtime import telemetry
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

from .calibrate import load_average
from .chainyard_path import ChainyardPath
from .core import HERE, Ctx, Figure, benchmark
from .drive import Completions, Run, drive

NAME = "tracing_overhead_ratio"


class _Counting:
    """Wraps the OTLP exporter to count what was exported."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.spans = 0
        self.failures = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        r = self.inner.export(spans)
        if r == SpanExportResult.SUCCESS:
            self.spans += len(spans)
        else:
            self.failures += 1
        return r

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


async def _receiver() -> tuple[asyncio.subprocess.Process, str]:
    script = HERE.parent / "tests" / "otlp_receiver.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--discard", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc, line.decode().strip()


def _provider(endpoint: str) -> tuple[Any, _Counting]:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _Counting(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
    provider = TracerProvider(
        resource=Resource.create({"service.name": "chainyard-bench"}),
        id_generator=telemetry._ChainIds(),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))  # defaults, as in production
    return provider, exporter


@benchmark(NAME, (NAME,))
async def tracing_overhead(ctx: Ctx) -> list[Figure]:
    """Single-step chains/s with every span exported over OTLP/HTTP vs tracing off."""
    n = ctx.n("n", 3000, 400)
    window = ctx.n("window", 256, 256)
    warm = ctx.n("warmup", 300, 100)
    rounds = max(1, ctx.n("rounds", 3, 2))
    tmo = 60 + n / 20
    load_before = load_average()
    recv, endpoint = await _receiver()
    provider, exporter = _provider(endpoint)
    off: list[Run] = []
    on: list[Run] = []
    try:
        async with NatsServer() as server:
            bus = await open_bus(server.url, name="bench-tracing")
            done = Completions()
            cy = ChainyardPath(bus, done, worker_slots=window, router_concurrency=window)
            try:
                await cy.start()
                telemetry.enable(provider, capture=False)
                await drive([f"tw-{i}" for i in range(warm)], cy.submit, done, window, tmo)
                telemetry.disable()
                await drive([f"ow-{i}" for i in range(warm)], cy.submit, done, window, tmo)
                await asyncio.to_thread(provider.force_flush)
                cy.check_alive()
                for r in range(rounds):
                    telemetry.disable()
                    off.append(await drive([f"off{r}-{i}" for i in range(n)], cy.submit, done,
                                           window, tmo))
                    telemetry.enable(provider, capture=False)
                    on.append(await drive([f"on{r}-{i}" for i in range(n)], cy.submit, done,
                                          window, tmo))
                    telemetry.disable()
                    await asyncio.to_thread(provider.force_flush)  # no export in the off round
            finally:
                telemetry.disable()
                await cy.stop()
                await bus.close()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(provider.shutdown)
        recv.terminate()
        await recv.wait()

    on_tp = statistics.median(r.per_s for r in on)
    off_tp = statistics.median(r.per_s for r in off)
    cond: dict[str, Any] = {
        "N": n,
        "in_flight_window": window,
        "rounds": rounds,
        "warmup": warm,
        "process": "driver, router and worker in one process, one connection; receiver apart",
        "provider": "NullProvider (instant, in process)",
        "exporter": "OTLP/HTTP protobuf, BatchSpanProcessor defaults",
        "receiver": "local process, reads and discards the body (tests/otlp_receiver.py --discard)",
        "settle_spans": telemetry.settle_spans,
        "sampler": "parent-based always-on (every chain traced)",
        "spans_exported": exporter.spans,
        "export_failures": exporter.failures,
        "spans_per_chain": round(exporter.spans / max(1, (n * rounds + warm)), 2),
        "on_rounds_per_s": [round(r.per_s, 1) for r in on],
        "off_rounds_per_s": [round(r.per_s, 1) for r in off],
        "on_p50_ms": round(statistics.median(r.pct(50) for r in on), 3),
        "off_p50_ms": round(statistics.median(r.pct(50) for r in off), 3),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "goal": ">= 0.85",
    }
    return [Figure(NAME, on_tp, "steps/s", "tracing_off_steps_per_s", off_tp, cond)]
