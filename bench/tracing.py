"""Figure tracing_overhead_ratio: the chainyard path with tracing exported vs tracing off.

One embedded nats-server, Router + Worker(NullProvider) in one process (bench.chainyard_path),
the same driver as nats_path. Tracing on = what `telemetry.setup` installs in a service
(`telemetry.build_provider`: chainyard's light spans, piped in batches to a helper process that
encodes OTLP protobuf directly and POSTs it with http.client), sending to a local OTLP receiver
in another process
(tests/otlp_receiver.py); off = chainyard's helpers with no tracer (what a service gets with no
OTEL_EXPORTER_OTLP_ENDPOINT). Rounds alternate off / on in the same run; the figure is the
median on-round throughput over the median off-round throughput (goal >= 0.85). The conditions
also carry this process's CPU per chain in each kind of round (all threads) and the exporter's
CPU per span (the helper process's, or the export thread's in mode 4). `--set mode=4` measures
the export thread it replaced, `--set mode=1|2` the SDK paths before that (SDK spans with the
direct encoder; SDK spans with the SDK's OTLP exporter), mode 3 spans made and queued in the
thread's batcher but never encoded or sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
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
    """Wraps an SDK exporter (modes 1 and 2) to count what was exported."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        r = self.inner.export(spans)
        if r == SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return r

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


MODES = {
    0: "chainyard light spans piped to a helper process: direct OTLP protobuf, http.client POST"
    " (production)",
    4: "chainyard light spans, batching thread in the service: direct OTLP protobuf encoder,"
    " http.client POST (before)",
    1: "SDK spans + BatchSpanProcessor, direct OTLP protobuf encoder",
    2: "SDK spans + BatchSpanProcessor + SDK OTLPSpanExporter (before)",
    3: "diagnosis: chainyard light spans queued, never encoded or sent",
}


async def _receiver() -> tuple[asyncio.subprocess.Process, str]:
    script = HERE.parent / "tests" / "otlp_receiver.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), "--discard", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc, line.decode().strip()


def _provider(endpoint: str, mode: int) -> tuple[Any, Any]:
    """(provider, exporter with .exported / .failed counts). Mode 0 is what `telemetry.setup`
    installs in a service; 1 and 2 are the SDK paths it replaced, for comparison."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from chainyard.runtime.telemetry_child import ChildExport
    from chainyard.runtime.telemetry_export import OtlpHttpExporter

    resource = Resource.create({"service.name": "chainyard-bench"})
    url = f"{endpoint}/v1/traces"
    if mode == 0:
        provider = telemetry.build_provider(resource, ChildExport(endpoint=url))
        return provider, provider.batcher  # OTEL_BSP_* defaults; the helper's counts
    if mode == 4:
        exporter = OtlpHttpExporter(endpoint=url)
        return telemetry.build_provider(resource, exporter), exporter
    if mode == 3:  # diagnosis: spans made and queued, never encoded or sent

        class _Null:
            exported = failed = 0

            def send(self, spans: Any) -> bool:
                self.exported += len(spans)
                return True

            def shutdown(self) -> None:
                pass

        exporter = _Null()
        return telemetry.build_provider(resource, exporter), exporter
    if mode == 1:
        exporter = _Counting(OtlpHttpExporter(endpoint=url))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = _Counting(OTLPSpanExporter(endpoint=url))
    provider = TracerProvider(resource=resource, id_generator=telemetry._ChainIds())
    provider.add_span_processor(BatchSpanProcessor(exporter))  # defaults, as before
    return provider, exporter


@benchmark(NAME, (NAME,))
async def tracing_overhead(ctx: Ctx) -> list[Figure]:
    """Single-step chains/s with every span exported over OTLP/HTTP vs tracing off."""
    n = ctx.n("n", 3000, 400)
    window = ctx.n("window", 256, 256)
    warm = ctx.n("warmup", 300, 100)
    rounds = max(1, ctx.n("rounds", 5, 2))  # the figure swings by +-0.05 a round here
    tmo = 60 + n / 20
    load_before = load_average()
    recv, endpoint = await _receiver()
    mode = ctx.n("mode", 0, 0)
    provider, exporter = _provider(endpoint, mode)
    off: list[Run] = []
    on: list[Run] = []
    cpu_off: list[float] = []  # this process's CPU (all threads) per chain, us
    cpu_on: list[float] = []
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
                    c0 = time.process_time()
                    off.append(
                        await drive([f"off{r}-{i}" for i in range(n)], cy.submit, done, window, tmo)
                    )
                    cpu_off.append((time.process_time() - c0) / n * 1e6)
                    telemetry.enable(provider, capture=False)
                    c0 = time.process_time()
                    on.append(
                        await drive([f"on{r}-{i}" for i in range(n)], cy.submit, done, window, tmo)
                    )
                    telemetry.disable()
                    await asyncio.to_thread(provider.force_flush)  # no export in the off round
                    cpu_on.append((time.process_time() - c0) / n * 1e6)  # export included
                if ctx.profile:  # an extra on round: the event loop's share of the tracing cost
                    telemetry.enable(provider, capture=False)
                    with ctx.profiled("tracing_on"):
                        await drive([f"prof-{i}" for i in range(n)], cy.submit, done, window, tmo)
                    telemetry.disable()
            finally:
                telemetry.disable()
                await cy.stop()
                await bus.close()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(provider.shutdown)
        recv.terminate()
        await recv.wait()

    exported = getattr(exporter, "exported", None)
    if exported is None:  # the helper process's count (mode 0)
        exported = exporter.exported_spans
    on_tp = statistics.median(r.per_s for r in on)
    off_tp = statistics.median(r.per_s for r in off)
    cond: dict[str, Any] = {
        "N": n,
        "in_flight_window": window,
        "rounds": rounds,
        "warmup": warm,
        "process": "driver, router and worker in one process, one connection; receiver apart",
        "provider": "NullProvider (instant, in process)",
        "mode": mode,
        "tracer_exporter": MODES[mode],
        "batch": "OTEL_BSP_* defaults (512 a batch, 5 s delay, 2048 queue)",
        "receiver": "local process, reads and discards the body (tests/otlp_receiver.py --discard)",
        "settle_spans": telemetry.settle_spans,
        "sampler": "parent-based always-on (every chain traced)",
        "spans_exported": exported,
        "spans_failed": exporter.failed,
        "spans_per_chain": round(exported / max(1, (n * rounds + warm)), 2),
        "on_rounds_per_s": [round(r.per_s, 1) for r in on],
        "off_rounds_per_s": [round(r.per_s, 1) for r in off],
        "cpu_us_per_chain_off": round(statistics.median(cpu_off), 1),
        "cpu_us_per_chain_on": round(statistics.median(cpu_on), 1),
        "tracing_cpu_us_per_span": round(
            (statistics.median(cpu_on) - statistics.median(cpu_off))
            / max(0.01, exported / max(1, n * rounds + warm)),
            1,
        ),
        "export_cpu_us_per_span": (
            round(provider.batcher.export_cpu_s / max(1, provider.batcher.exported_spans) * 1e6, 1)
            if hasattr(provider, "batcher")
            else None
        ),
        "on_p50_ms": round(statistics.median(r.pct(50) for r in on), 3),
        "off_p50_ms": round(statistics.median(r.pct(50) for r in off), 3),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "goal": ">= 0.85",
    }
    return [Figure(NAME, on_tp, "steps/s", "tracing_off_steps_per_s", off_tp, cond)]
