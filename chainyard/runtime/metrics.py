"""Metrics: Prometheus scraping (`--metrics-port`) and OTel metrics over OTLP (when configured).

Off by default (`metrics.on` False: recording does nothing). Each metric is defined once in
`METRICS` and goes to both backends; docs/TRACING.md ("Metrics") and docs/OPERATIONS.md describe
them, and the bound on the `tenant` label (`metrics_max_tenants`, then `tenant="other"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, get_args

from chainyard.contracts import DLQ_SOURCES, ErrorClass

from .probes import Probes

BREAKER = {"closed": 0, "half_open": 1, "open": 2}
LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CACHE_STORE_OUTCOMES = ("stored", "too_large", "error")  # router/cache.py ResponseCache.store
CHAIN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
OTHER_TENANTS = "other"
DEFAULT_MAX_TENANTS = 50
# A kind of metric: the prometheus_client class and its method, the OTel instrument and its.
KINDS = {
    "counter": ("Counter", "inc", "create_counter", "add"),
    "up_down": ("Gauge", "inc", "create_up_down_counter", "add"),
    "gauge": ("Gauge", "set", "create_gauge", "set"),
    "histogram": ("Histogram", "observe", "create_histogram", "record"),
}


@dataclass(frozen=True)
class Metric:
    kind: str  # a key of KINDS
    prometheus: str  # a counter's series gets `_total` added by prometheus_client
    otel: str
    unit: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = ()  # a Prometheus histogram's (OTel's are the SDK's default)


PD = ("pool", "deployment")
# by the short name the recording methods use
METRICS = {
    "routed": Metric("counter", "chainyard_steps_routed", "chainyard.steps.routed", "{step}",
                     PD, "assignments sent by the router"),
    "completed": Metric("counter", "chainyard_steps_completed", "chainyard.steps.completed",
                        "{step}", PD, "step.completed events sent by workers"),
    "failed": Metric("counter", "chainyard_steps_failed", "chainyard.steps.failed", "{step}",
                     (*PD, "error_class"), "step.failed events sent by workers"),
    "latency": Metric("histogram", "chainyard_step_latency_seconds", "chainyard.step.latency",
                      "s", (*PD, "outcome"), "provider call latency", LAT_BUCKETS),
    "cost": Metric("counter", "chainyard_cost_usd", "chainyard.cost", "USD", PD,
                   "cost of completed calls"),
    "tokens": Metric("counter", "chainyard_tokens", "chainyard.tokens", "{token}",
                     (*PD, "type"), "input / output tokens"),
    "in_flight": Metric("up_down", "chainyard_in_flight", "chainyard.in_flight", "{message}",
                        ("pool",), "work messages being handled by this process"),
    "depth": Metric("gauge", "chainyard_queue_depth", "chainyard.queue.depth", "{message}",
                    ("pool",), "messages waiting in the pool's work consumer (num_pending)"),
    "ack_pending": Metric("gauge", "chainyard_queue_ack_pending", "chainyard.queue.ack_pending",
                          "{message}", ("pool",), "delivered, not yet acked"),
    "breaker": Metric("gauge", "chainyard_breaker_state", "chainyard.breaker.state", "1",
                      ("deployment",), "0 closed, 1 half open, 2 open (router)"),
    "chains": Metric("counter", "chainyard_chains_ended", "chainyard.chains.ended", "{chain}",
                     ("outcome",), "chains that ended, by outcome (router)"),
    "chain_s": Metric("histogram", "chainyard_chain_duration_seconds", "chainyard.chain.duration",
                      "s", ("outcome",), "chain durations (router)", CHAIN_BUCKETS),
    "lag": Metric("gauge", "chainyard_queue_lag_seconds", "chainyard.queue.lag", "s", ("pool",),
                  "age of the oldest work message not yet delivered"),
    "dead": Metric("counter", "chainyard_dead_letters", "chainyard.dead_letters", "{message}",
                   ("source",), "messages set aside in the dead-letter stream"),
    "cache_hits": Metric("counter", "chainyard_cache_hits", "chainyard.cache.hits", "{step}", PD,
                         "steps answered from the response cache (router)"),
    "cache_misses": Metric("counter", "chainyard_cache_misses", "chainyard.cache.misses",
                           "{step}", PD, "opted-in steps the cache could not answer"),
    "cache_saved": Metric("counter", "chainyard_cache_saved_usd", "chainyard.cache.saved", "USD",
                          PD, "what the cached answers had cost"),
    "cache_stores": Metric("counter", "chainyard_cache_stores", "chainyard.cache.stores",
                           "{answer}", ("pool", "outcome"), "answers stored, or not (outcome)"),
    "t_chains": Metric("counter", "chainyard_tenant_chains_ended",
                       "chainyard.tenant.chains.ended", "{chain}", ("tenant", "outcome"),
                       "chains that ended, per tenant (router)"),
    "t_tokens": Metric("counter", "chainyard_tenant_tokens", "chainyard.tenant.tokens",
                       "{token}", ("tenant", "type"), "input / output tokens of ended chains"),
    "t_cost": Metric("counter", "chainyard_tenant_cost_usd", "chainyard.tenant.cost", "USD",
                     ("tenant",), "cost of ended chains (router)"),
}  # fmt: skip


Recorder = Callable[[float, dict[str, str]], None]


class Metrics:
    def __init__(self) -> None:
        self.on = False
        self.registry: Any = None  # prometheus CollectorRegistry
        self._prometheus: dict[str, Any] = {}  # prometheus metrics by short name
        # each backend's recording, by short name (every name: a misspelt one is a KeyError)
        self._recorders: dict[str, list[Recorder]] = {name: [] for name in METRICS}
        self._meter_provider: Any = None
        self.max_tenants = DEFAULT_MAX_TENANTS
        self._tenants: set[str] = set()  # the ones that keep their name in the `tenant` label

    def setup(
        self,
        *,
        prometheus: bool = False,
        otlp: bool = False,
        service: str = "chainyard",
        max_tenants: int = DEFAULT_MAX_TENANTS,
    ) -> None:
        """prometheus: keep a registry (served on the service port by runtime.probes)."""
        self.max_tenants = max_tenants
        if prometheus:
            self._setup_prometheus()
        if otlp:
            self._setup_otel(service)
        self.on = prometheus or otlp

    def _setup_prometheus(self) -> None:
        import prometheus_client

        self.registry = prometheus_client.CollectorRegistry()
        for name, m in METRICS.items():
            cls, method, _, _ = KINDS[m.kind]
            extra = {"buckets": m.buckets} if m.buckets else {}
            p = getattr(prometheus_client, cls)(
                m.prometheus, m.help, m.labels, registry=self.registry, **extra
            )
            self._prometheus[name] = p
            self._recorders[name].append(
                lambda v, labels, p=p, method=method: getattr(p.labels(**labels), method)(v)
            )
        self._start_at_zero("dead", ({"source": s} for s in DLQ_SOURCES))

    def _setup_otel(self, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from .tracing import resource

        reader = PeriodicExportingMetricReader(OTLPMetricExporter())  # OTEL_METRIC_EXPORT_*
        self._meter_provider = MeterProvider(metric_readers=[reader], resource=resource(service))
        meter = self._meter_provider.get_meter("chainyard")
        for name, m in METRICS.items():
            _, _, create, method = KINDS[m.kind]
            instrument = getattr(meter, create)(m.otel, unit=m.unit, description=m.help)
            self._recorders[name].append(getattr(instrument, method))

    def shutdown(self) -> None:
        if self._meter_provider is not None:
            with contextlib.suppress(Exception):
                self._meter_provider.shutdown()
        self.__init__()  # type: ignore[misc]

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry) if self.registry is not None else b""

    def _start_at_zero(self, name: str, label_sets: Iterable[dict[str, str]]) -> None:
        """Create these series at 0, so that their first increase is one Prometheus sees."""
        p = self._prometheus.get(name)
        if p is not None:
            for labels in label_sets:
                p.labels(**labels)

    # -- recording: a no-op while off (no backend records anything) ------------------------

    def record(self, name: str, value: float, /, **labels: str) -> None:
        """Add `value` to the counter `METRICS[name]`, set the gauge to it or observe it, in
        every backend."""
        for record in self._recorders[name]:
            record(value, labels)

    def step_result(self, ev: Any) -> None:
        """A step event a worker is about to publish."""
        if not self.on:
            return
        where = {"pool": ev.target.pool, "deployment": ev.target.deployment}
        ok = ev.__struct_config__.tag == "step.completed"
        if ok:
            self.record("completed", 1, **where)
            if ev.cost_usd:
                self.record("cost", ev.cost_usd, **where)
            self.record("tokens", ev.usage.input_tokens, **where, type="input")
            self.record("tokens", ev.usage.output_tokens, **where, type="output")
        else:
            self.record("failed", 1, **where, error_class=ev.error.cls)
        outcome = "completed" if ok else "failed"
        self.record("latency", ev.latency_ms / 1000, **where, outcome=outcome)

    def breaker(self, deployment: str, status: str) -> None:
        self.record("breaker", BREAKER.get(status, 2), deployment=deployment)

    def chain_ended(
        self,
        outcome: str,
        duration_s: float,
        cost_usd: float,
        tenant: str | None = None,
        usage: Any = None,
    ) -> None:
        if not self.on:
            return
        self.record("chains", 1, outcome=outcome)
        self.record("chain_s", duration_s, outcome=outcome)
        if tenant is None:
            return
        if tenant not in self._tenants and len(self._tenants) < self.max_tenants:
            self._tenants.add(tenant)
        who = tenant if tenant in self._tenants else OTHER_TENANTS  # a bounded number of series
        self.record("t_chains", 1, tenant=who, outcome=outcome)
        self.record("t_cost", cost_usd, tenant=who)
        if usage is not None:
            self.record("t_tokens", usage.input_tokens, tenant=who, type="input")
            self.record("t_tokens", usage.output_tokens, tenant=who, type="output")

    def served(self, pool: str, deployment: str) -> None:
        """A worker's deployment: its step counters exist at 0 from the start, so the first
        calls (the first failures) are an increase Prometheus sees."""
        where = {"pool": pool, "deployment": deployment}
        self._start_at_zero("completed", [where])
        self._start_at_zero("cost", [where])
        self._start_at_zero("failed", ({**where, "error_class": c} for c in get_args(ErrorClass)))
        self._start_at_zero("latency", ({**where, "outcome": o} for o in ("completed", "failed")))

    def routes_to(self, pool: str, deployment: str) -> None:
        """A router's deployment: its routing and cache counters exist at 0 from the start."""
        for name in ("routed", "cache_hits", "cache_misses", "cache_saved"):
            self._start_at_zero(name, [{"pool": pool, "deployment": deployment}])
        self._start_at_zero(
            "cache_stores", ({"pool": pool, "outcome": o} for o in CACHE_STORE_OUTCOMES)
        )


metrics = Metrics()


async def poll(bus: Any, config: Any, runners: list[Any], every_s: float = 5.0) -> None:
    """Queue depth and lag per pool (consumer info) and breaker states (router), every `every_s`,
    until cancelled."""
    topo = bus.topology
    served = {r.pool for r in runners if hasattr(r, "pool")}
    pools = sorted({d.pool for d in config.deployments} | {p.name for p in config.pools} | served)
    breakers = [r.routing.breakers for r in runners if hasattr(r, "routing")]
    for d in config.deployments:
        if d.pool in served:
            metrics.served(d.pool, d.name)
        if breakers:  # a router
            metrics.routes_to(d.pool, d.name)
    while True:
        for pool in pools:
            try:
                info = await bus.js.consumer_info(
                    topo.work.name, topo.pool_consumer(pool).durable, timeout=2.0
                )
                metrics.record("depth", info.num_pending or 0, pool=pool)
                metrics.record("ack_pending", info.num_ack_pending or 0, pool=pool)
                metrics.record("lag", await _oldest_waiting_s(bus.js, topo, pool, info), pool=pool)
            except Exception:  # no consumer yet (no worker ever joined): nothing waits there
                continue
        for b in breakers:
            for d in config.deployments:
                metrics.breaker(d.name, b.status(d.name).status)
        await asyncio.sleep(every_s)


async def _oldest_waiting_s(js: Any, topo: Any, pool: str, info: Any) -> float:
    """How long the pool's oldest undelivered work message has waited (0: none waits)."""
    if not info.num_pending:
        return 0.0
    msg = await js.get_msg(
        topo.work.name,
        seq=(info.delivered.stream_seq or 0) + 1,
        subject=topo.pool_consumer(pool).filter_subject,
        next=True,
    )
    return 0.0 if msg.time is None else max(0.0, time.time() - msg.time.timestamp())


@dataclass
class Observability:
    """What one service process turned on; `stop` flushes and shuts it down."""

    tracing: bool
    probes: Probes
    _poller: asyncio.Task[None] | None

    async def stop(self) -> None:
        from . import tracing

        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
        if self.tracing:
            await asyncio.to_thread(tracing.shutdown)
        await self.probes.stop()
        metrics.shutdown()


async def start_service(
    kind: str,
    bus: Any,
    config: Any,
    runners: list[Any],
    metrics_port: int | None = None,
    probes: Probes | None = None,
) -> Observability:
    """Tracing from the OTEL_* variables, metrics on OTLP and/or the service port (`probes`,
    started on `metrics_port` here unless the caller started it earlier), and the poller."""
    from . import tracing

    default = f"chainyard-{kind}"
    traced = tracing.setup(default)
    otlp = (
        tracing.configured()
        and tracing.otlp_endpoint()
        and os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower() != "none"
    )
    probes = probes or Probes()
    if metrics_port is not None and probes.port is None:
        await probes.start(metrics_port)
    max_tenants = getattr(config, "metrics_max_tenants", DEFAULT_MAX_TENANTS)
    metrics.setup(
        prometheus=probes.port is not None, otlp=otlp, service=default, max_tenants=max_tenants
    )
    probes.registry = metrics.registry
    poller = asyncio.create_task(poll(bus, config, runners)) if metrics.on else None
    return Observability(traced, probes, poller)
