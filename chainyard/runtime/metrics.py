"""Metrics: Prometheus scraping (`--metrics-port`) and OTel metrics over OTLP (when configured).

Off by default: `metrics.on` is False and every recording call returns at once. The same
numbers go to both backends:

| Prometheus name | labels | what |
|---|---|---|
| chainyard_steps_routed_total | pool, deployment | assignments sent by the router |
| chainyard_steps_completed_total | pool, deployment | step.completed events sent by workers |
| chainyard_steps_failed_total | pool, deployment, error_class | step.failed events sent |
| chainyard_step_latency_seconds | pool, deployment, outcome | call latency (histogram) |
| chainyard_cost_usd_total | pool, deployment | cost of completed calls |
| chainyard_tokens_total | pool, deployment, type | input / output tokens |
| chainyard_in_flight | pool | work messages being handled by this process |
| chainyard_queue_depth | pool | messages waiting in the pool's work consumer (num_pending) |
| chainyard_queue_ack_pending | pool | delivered, not yet acked |
| chainyard_breaker_state | deployment | 0 closed, 1 half open, 2 open (router) |
| chainyard_chains_ended_total | outcome | chains that ended, by outcome (router) |
| chainyard_chain_duration_seconds | outcome | chain durations (histogram) |
| chainyard_queue_lag_seconds | pool | age of the oldest work message not yet delivered |
| chainyard_dead_letters_total | source | messages set aside in the dead-letter stream |
| chainyard_cache_hits_total | pool, deployment | steps answered from the response cache (router) |
| chainyard_cache_misses_total | pool, deployment | opted-in steps the cache could not answer |
| chainyard_cache_saved_usd_total | pool, deployment | what the cached answers had cost |
| chainyard_cache_stores_total | pool, outcome | answers stored, or not (too_large, error) |
| chainyard_tenant_chains_ended_total | tenant, outcome | chains that ended, per tenant (router) |
| chainyard_tenant_tokens_total | tenant, type | input / output tokens of ended chains (router) |
| chainyard_tenant_cost_usd_total | tenant | cost of ended chains (router) |

The tenant metrics count a chain when it ends, as `chainyard usage` does, so their totals are
the report's. The `tenant` label is bounded: past `metrics_max_tenants` (config, default 50)
distinct tenants in one process, the next ones are counted under `tenant="other"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, get_args

from chainyard.contracts import DLQ_SOURCES, ErrorClass

from .probes import Probes

log = logging.getLogger("chainyard.metrics")
BREAKER = {"closed": 0, "half_open": 1, "open": 2}
LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CACHE_STORE_OUTCOMES = ("stored", "too_large", "error")  # router/cache.py ResponseCache.store
CHAIN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
OTHER_TENANTS = "other"
DEFAULT_MAX_TENANTS = 50


class TenantLabels:
    """The `tenant` label: the first `limit` tenants seen keep their name, later ones share
    `other`, so a deployment with many tenants cannot grow the series without bound."""

    def __init__(self, limit: int = DEFAULT_MAX_TENANTS) -> None:
        self.limit = limit
        self._own: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._own:
            return tenant
        if len(self._own) < self.limit:
            self._own.add(tenant)
            return tenant
        return OTHER_TENANTS


class Metrics:
    def __init__(self) -> None:
        self.on = False
        self.registry: Any = None  # prometheus CollectorRegistry
        self._p: dict[str, Any] = {}  # prometheus metrics by short name
        self._o: dict[str, Any] = {}  # otel instruments by short name
        self._meter_provider: Any = None
        self.tenant_label = TenantLabels()

    # -- set up ----------------------------------------------------------------------------

    def setup(
        self,
        *,
        prometheus: bool = False,
        otlp: bool = False,
        service: str = "chainyard",
        max_tenants: int = DEFAULT_MAX_TENANTS,
    ) -> None:
        """prometheus: keep a registry (served on the service port by runtime.probes)."""
        self.tenant_label = TenantLabels(max_tenants)
        if prometheus:
            self._prometheus()
        if otlp:
            self._otel(service)
        self.on = bool(self._p or self._o)

    def _prometheus(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        p = self._p
        p["routed"] = Counter(
            "chainyard_steps_routed", "assignments sent", ["pool", "deployment"], registry=r
        )
        p["completed"] = Counter(
            "chainyard_steps_completed", "steps completed", ["pool", "deployment"], registry=r
        )
        p["failed"] = Counter(
            "chainyard_steps_failed",
            "steps failed",
            ["pool", "deployment", "error_class"],
            registry=r,
        )
        p["latency"] = Histogram(
            "chainyard_step_latency_seconds",
            "call latency",
            ["pool", "deployment", "outcome"],
            buckets=LAT_BUCKETS,
            registry=r,
        )
        p["cost"] = Counter("chainyard_cost_usd", "USD spent", ["pool", "deployment"], registry=r)
        p["tokens"] = Counter(
            "chainyard_tokens", "tokens", ["pool", "deployment", "type"], registry=r
        )
        p["in_flight"] = Gauge("chainyard_in_flight", "work being handled", ["pool"], registry=r)
        p["depth"] = Gauge("chainyard_queue_depth", "work waiting", ["pool"], registry=r)
        p["ack_pending"] = Gauge(
            "chainyard_queue_ack_pending", "delivered, not acked", ["pool"], registry=r
        )
        p["breaker"] = Gauge(
            "chainyard_breaker_state", "0 closed, 1 half open, 2 open", ["deployment"], registry=r
        )
        p["chains"] = Counter("chainyard_chains_ended", "chains ended", ["outcome"], registry=r)
        p["chain_s"] = Histogram(
            "chainyard_chain_duration_seconds",
            "chain duration",
            ["outcome"],
            buckets=CHAIN_BUCKETS,
            registry=r,
        )
        p["lag"] = Gauge(
            "chainyard_queue_lag_seconds", "oldest undelivered work", ["pool"], registry=r
        )
        p["dead"] = Counter(
            "chainyard_dead_letters", "messages dead-lettered", ["source"], registry=r
        )
        for source in DLQ_SOURCES:  # at 0 from the start: the first one is an increase
            p["dead"].labels(source=source)
        p["cache_hits"] = Counter(
            "chainyard_cache_hits", "cache hits", ["pool", "deployment"], registry=r
        )
        p["cache_misses"] = Counter(
            "chainyard_cache_misses", "cache misses", ["pool", "deployment"], registry=r
        )
        p["cache_saved"] = Counter(
            "chainyard_cache_saved_usd", "USD saved by hits", ["pool", "deployment"], registry=r
        )
        p["cache_stores"] = Counter(
            "chainyard_cache_stores", "answers offered to the cache", ["pool", "outcome"],
            registry=r,
        )  # fmt: skip
        p["t_chains"] = Counter(
            "chainyard_tenant_chains_ended", "chains ended", ["tenant", "outcome"], registry=r
        )
        p["t_tokens"] = Counter(
            "chainyard_tenant_tokens", "tokens of ended chains", ["tenant", "type"], registry=r
        )
        p["t_cost"] = Counter(
            "chainyard_tenant_cost_usd", "USD of ended chains", ["tenant"], registry=r
        )

    def _otel(self, service: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        from .tracing import resource

        reader = PeriodicExportingMetricReader(OTLPMetricExporter())  # OTEL_METRIC_EXPORT_*
        self._meter_provider = MeterProvider(metric_readers=[reader], resource=resource(service))
        m = self._meter_provider.get_meter("chainyard")
        o = self._o
        o["routed"] = m.create_counter("chainyard.steps.routed", "{step}")
        o["completed"] = m.create_counter("chainyard.steps.completed", "{step}")
        o["failed"] = m.create_counter("chainyard.steps.failed", "{step}")
        o["latency"] = m.create_histogram("chainyard.step.latency", "s")
        o["cost"] = m.create_counter("chainyard.cost", "USD")
        o["tokens"] = m.create_counter("chainyard.tokens", "{token}")
        o["in_flight"] = m.create_up_down_counter("chainyard.in_flight", "{message}")
        o["depth"] = m.create_gauge("chainyard.queue.depth", "{message}")
        o["ack_pending"] = m.create_gauge("chainyard.queue.ack_pending", "{message}")
        o["breaker"] = m.create_gauge("chainyard.breaker.state", "1")
        o["chains"] = m.create_counter("chainyard.chains.ended", "{chain}")
        o["chain_s"] = m.create_histogram("chainyard.chain.duration", "s")
        o["lag"] = m.create_gauge("chainyard.queue.lag", "s")
        o["dead"] = m.create_counter("chainyard.dead_letters", "{message}")
        o["cache_hits"] = m.create_counter("chainyard.cache.hits", "{step}")
        o["cache_misses"] = m.create_counter("chainyard.cache.misses", "{step}")
        o["cache_saved"] = m.create_counter("chainyard.cache.saved", "USD")
        o["cache_stores"] = m.create_counter("chainyard.cache.stores", "{answer}")
        o["t_chains"] = m.create_counter("chainyard.tenant.chains.ended", "{chain}")
        o["t_tokens"] = m.create_counter("chainyard.tenant.tokens", "{token}")
        o["t_cost"] = m.create_counter("chainyard.tenant.cost", "USD")

    def shutdown(self) -> None:
        if self._meter_provider is not None:
            with contextlib.suppress(Exception):
                self._meter_provider.shutdown()
        self.__init__()  # type: ignore[misc]

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry) if self.registry is not None else b""

    # -- recording -------------------------------------------------------------------------

    def _add(self, name: str, value: float, labels: dict[str, str]) -> None:
        p = self._p.get(name)
        if p is not None:
            p.labels(**labels).inc(value)
        o = self._o.get(name)
        if o is not None:
            o.add(value, labels)

    def _observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        p = self._p.get(name)
        if p is not None:
            p.labels(**labels).observe(value)
        o = self._o.get(name)
        if o is not None:
            o.record(value, labels)

    def _set(self, name: str, value: float, labels: dict[str, str]) -> None:
        p = self._p.get(name)
        if p is not None:
            p.labels(**labels).set(value)
        o = self._o.get(name)
        if o is not None:
            o.set(value, labels)

    def routed(self, pool: str, deployment: str) -> None:
        if self.on:
            self._add("routed", 1, {"pool": pool, "deployment": deployment})

    def step_result(self, ev: Any) -> None:
        """A step event a worker is about to publish."""
        if not self.on:
            return
        t = ev.target
        where = {"pool": t.pool, "deployment": t.deployment}
        ok = ev.__struct_config__.tag == "step.completed"
        if ok:
            self._add("completed", 1, where)
            if ev.cost_usd:
                self._add("cost", ev.cost_usd, where)
            self._add("tokens", ev.usage.input_tokens, {**where, "type": "input"})
            self._add("tokens", ev.usage.output_tokens, {**where, "type": "output"})
        else:
            self._add("failed", 1, {**where, "error_class": ev.error.cls})
        self._observe(
            "latency", ev.latency_ms / 1000, {**where, "outcome": "completed" if ok else "failed"}
        )

    def in_flight(self, pool: str, delta: int) -> None:
        if self.on:
            p = self._p.get("in_flight")
            if p is not None:
                p.labels(pool=pool).inc(delta)
            o = self._o.get("in_flight")
            if o is not None:
                o.add(delta, {"pool": pool})

    def queue(self, pool: str, pending: int, ack_pending: int) -> None:
        if self.on:
            self._set("depth", pending, {"pool": pool})
            self._set("ack_pending", ack_pending, {"pool": pool})

    def breaker(self, deployment: str, status: str) -> None:
        if self.on:
            self._set("breaker", BREAKER.get(status, 2), {"deployment": deployment})

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
        self._add("chains", 1, {"outcome": outcome})
        self._observe("chain_s", duration_s, {"outcome": outcome})
        if tenant is None:
            return
        who = self.tenant_label(tenant)
        self._add("t_chains", 1, {"tenant": who, "outcome": outcome})
        self._add("t_cost", cost_usd, {"tenant": who})
        if usage is not None:
            self._add("t_tokens", usage.input_tokens, {"tenant": who, "type": "input"})
            self._add("t_tokens", usage.output_tokens, {"tenant": who, "type": "output"})

    def served(self, pool: str, deployment: str) -> None:
        """A worker's deployment: its step counters exist at 0 from the start, so the first
        calls (the first failures) are an increase Prometheus sees."""
        where = {"pool": pool, "deployment": deployment}
        for name in ("completed", "cost"):
            if (p := self._p.get(name)) is not None:
                p.labels(**where)
        if (p := self._p.get("failed")) is not None:
            for cls in get_args(ErrorClass):
                p.labels(**where, error_class=cls)
        if (p := self._p.get("latency")) is not None:
            for outcome in ("completed", "failed"):
                p.labels(**where, outcome=outcome)

    def routes_to(self, pool: str, deployment: str) -> None:
        """A router's deployment: its routing and cache counters exist at 0 from the start."""
        where = {"pool": pool, "deployment": deployment}
        for name in ("routed", "cache_hits", "cache_misses", "cache_saved"):
            if (p := self._p.get(name)) is not None:
                p.labels(**where)
        if (p := self._p.get("cache_stores")) is not None:
            for outcome in CACHE_STORE_OUTCOMES:
                p.labels(pool=pool, outcome=outcome)

    def queue_lag(self, pool: str, seconds: float) -> None:
        if self.on:
            self._set("lag", seconds, {"pool": pool})

    def dead_letter(self, source: str) -> None:
        if self.on:
            self._add("dead", 1, {"source": source})

    def cache_hit(self, pool: str, deployment: str, saved_usd: float) -> None:
        if self.on:
            where = {"pool": pool, "deployment": deployment}
            self._add("cache_hits", 1, where)
            self._add("cache_saved", saved_usd, where)

    def cache_miss(self, pool: str, deployment: str) -> None:
        if self.on:
            self._add("cache_misses", 1, {"pool": pool, "deployment": deployment})

    def cache_stored(self, pool: str, outcome: str) -> None:
        if self.on:
            self._add("cache_stores", 1, {"pool": pool, "outcome": outcome})


metrics = Metrics()


async def poll(
    bus: Any, config: Any, runners: list[Any], stop: asyncio.Event, every_s: float = 5.0
) -> None:
    """Queue depth per pool (consumer info) and breaker states (router), every `every_s`."""
    topo = bus.topology
    pools = {d.pool for d in config.deployments} | {p.name for p in config.pools}
    pools |= {r.pool for r in runners if hasattr(r, "pool")}
    breakers = [r.routing.breakers for r in runners if hasattr(r, "routing")]
    served = {r.pool for r in runners if hasattr(r, "pool")}
    for d in config.deployments:
        if d.pool in served:
            metrics.served(d.pool, d.name)
        if breakers:  # a router
            metrics.routes_to(d.pool, d.name)
    while not stop.is_set():
        for pool in sorted(pools):
            try:
                info = await bus.js.consumer_info(
                    topo.work.name, topo.pool_consumer(pool).durable, timeout=2.0
                )
                metrics.queue(pool, info.num_pending or 0, info.num_ack_pending or 0)
                metrics.queue_lag(pool, await _oldest_waiting_s(bus.js, topo, pool, info))
            except Exception:  # no consumer yet (no worker ever joined): nothing waits there
                continue
        for b in breakers:
            for d in config.deployments:
                metrics.breaker(d.name, b.status(d.name).status)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


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
    if msg.time is None:
        return 0.0
    return max(0.0, time.time() - msg.time.timestamp())


class Observability:
    """What one service process turned on; `stop` flushes and shuts it down."""

    def __init__(
        self, tracing: bool, task: asyncio.Task[None] | None, stop: asyncio.Event, probes: Probes
    ) -> None:
        self.tracing = tracing
        self.probes = probes
        self._task = task
        self._stop = stop

    async def stop(self) -> None:
        from . import tracing

        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await self._task
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
    stop = asyncio.Event()
    task = asyncio.create_task(poll(bus, config, runners, stop)) if metrics.on else None
    return Observability(traced, task, stop, probes)
