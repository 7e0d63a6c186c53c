"""`chainyard top`'s data model: what the services already publish, folded into a `Snapshot`.

`Feed` is fed message by message (worker heartbeats from KV `cy_capacity`, breakers from KV
`cy_breakers`, chain states from KV `cy_chains`, each pool consumer's pending counts, and the
event log) and `Feed.snapshot(now_ms)` turns it into plain rows for the screen. No I/O here:
top_feed.py reads NATS, top.py draws; this module is data in, rows out, so it is tested alone.

Windows: latency percentiles and error rates per pool over the last `WINDOW_MS` of step events;
cost and tokens per minute per deployment over the last minute; spend today per tenant since
midnight UTC (each step's cost when it completes, so it rises as chains run).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

import msgspec

from chainyard.contracts import DeploymentHealth, Usage

WINDOW_MS = 5 * 60_000  # latency and error rate
MINUTE_MS = 60_000
DAY_MS = 86_400_000
FAILURES_KEPT = 50
SAMPLES_KEPT = 200_000  # step events inside the window, at most (memory stays bounded)
STALE_BEATS = 3  # a heartbeat older than 3 of its intervals: its worker is gone (as the router)
BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}


# -- what is read: just the fields top shows (events' outputs and chains' steps are skipped) --


class _Target(msgspec.Struct):
    deployment: str
    pool: str


class _Error(msgspec.Struct):
    cls: str = ""
    message: str = ""


class _StepEvent(msgspec.Struct, kw_only=True):
    chain_id: str
    step_id: str
    target: _Target
    latency_ms: float = 0.0
    usage: Usage = Usage()
    cost_usd: float = 0.0
    error: _Error | None = None  # step.failed


class _ChainFailure(msgspec.Struct, kw_only=True):
    chain_id: str
    reason: str = ""
    step_id: str | None = None


class _ChainLite(msgspec.Struct, kw_only=True):
    status: str = "running"


class _Heartbeat(msgspec.Struct, kw_only=True):
    pool: str
    worker: str
    slots_total: int = 0
    slots_free: int = 0
    at_ms: int = 0
    interval_ms: int = 0
    deployments: dict[str, DeploymentHealth] = {}
    draining: bool = False


class _Breaker(msgspec.Struct, kw_only=True):
    status: str = "closed"
    reason: str = ""


_step = msgspec.json.Decoder(_StepEvent)
_chain_failure = msgspec.json.Decoder(_ChainFailure)
_chain = msgspec.json.Decoder(_ChainLite)
_heartbeat = msgspec.json.Decoder(_Heartbeat)
_breaker = msgspec.json.Decoder(_Breaker)


# -- what is shown -------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolRow:
    pool: str
    workers: int
    slots_free: int
    slots_total: int
    queued: int  # in the pool's consumer, not yet fetched by a worker
    in_flight: int  # fetched, not yet acked
    p50_ms: float | None
    p95_ms: float | None
    error_rate: float | None  # failed / (completed + failed) in the window; None: no calls
    breaker: str  # the worst of its deployments': closed, half_open, open
    headroom: str  # the provider's remaining requests / tokens, as the workers last saw them


@dataclass(frozen=True)
class DeploymentRow:
    deployment: str
    pool: str
    calls_per_min: int
    tokens_per_min: int
    cost_per_min: float
    breaker: str


@dataclass(frozen=True)
class TenantRow:
    tenant: str
    running: int
    chains_today: int  # ended since midnight UTC
    spend_today: float
    tokens_today: int


@dataclass(frozen=True)
class Failure:
    at_ms: int
    tenant: str
    chain_id: str
    where: str  # step@deployment, or "chain"
    reason: str


@dataclass(frozen=True)
class Snapshot:
    at_ms: int
    pools: list[PoolRow]
    deployments: list[DeploymentRow]
    tenants: list[TenantRow]
    failures: list[Failure]  # newest first
    events: int  # event-log messages read so far


@dataclass(slots=True)
class _Sample:
    at_ms: int
    pool: str
    deployment: str
    ok: bool
    latency_ms: float
    tokens: int
    cost: float


@dataclass
class _Tenant:
    spend: float = 0.0
    tokens: int = 0
    ended: int = 0


@dataclass
class Feed:
    """Everything top has read so far; update with `on_*`, read with `snapshot`."""

    heartbeats: dict[str, _Heartbeat] = field(default_factory=dict)  # "<pool>.<worker>"
    breakers: dict[str, _Breaker] = field(default_factory=dict)  # by deployment
    queues: dict[str, tuple[int, int]] = field(default_factory=dict)  # pool -> pending, acks
    running: dict[str, str] = field(default_factory=dict)  # running chain's KV key -> tenant
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=SAMPLES_KEPT))
    failures: deque[Failure] = field(default_factory=lambda: deque(maxlen=FAILURES_KEPT))
    pool_of: dict[str, str] = field(default_factory=dict)  # deployment -> pool, as seen
    today: dict[str, _Tenant] = field(default_factory=lambda: defaultdict(_Tenant))
    day: int = -1  # the UTC day `today` counts
    events: int = 0
    prefix: str = "cy"

    # -- inputs ----------------------------------------------------------------------------

    def on_heartbeat(self, key: str, data: bytes | None) -> None:
        if not data:
            self.heartbeats.pop(key, None)
            return
        hb = _decode(_heartbeat, data)
        if hb is not None:
            self.heartbeats[key] = hb
            for dep in hb.deployments:
                self.pool_of.setdefault(dep, hb.pool)

    def on_breaker(self, deployment: str, data: bytes | None) -> None:
        b = _decode(_breaker, data) if data else None
        if b is None:
            self.breakers.pop(deployment, None)
        else:
            self.breakers[deployment] = b

    def on_chain(self, key: str, data: bytes | None) -> None:
        """A chain state from KV `cy_chains` (key `<tenant>.<chain>`); None: deleted."""
        st = _decode(_chain, data) if data else None
        if st is not None and st.status == "running":
            self.running[key] = key.partition(".")[0]
        else:
            self.running.pop(key, None)

    def on_queue(self, pool: str, pending: int, ack_pending: int) -> None:
        self.queues[pool] = (pending, ack_pending)

    def on_event(self, subject: str, data: bytes, at_ms: int) -> None:
        """One message of the event log, stored at `at_ms`."""
        parts = subject.split(".", 4)
        if len(parts) != 5 or parts[0] != self.prefix:
            return
        self.events += 1
        tenant, chain_id, kind = parts[2], parts[3], parts[4]
        if at_ms // DAY_MS != self.day:
            if at_ms // DAY_MS < self.day:
                return  # an event of an earlier day (the log is read from midnight on)
            self.day = at_ms // DAY_MS
            self.today.clear()
        if kind in ("step.completed", "step.failed"):
            ev = _decode(_step, data)
            if ev is None:
                return
            ok = kind == "step.completed"
            t = ev.target
            self.pool_of[t.deployment] = t.pool
            tokens = ev.usage.input_tokens + ev.usage.output_tokens
            self.samples.append(
                _Sample(at_ms, t.pool, t.deployment, ok, ev.latency_ms, tokens, ev.cost_usd)
            )
            if ok:
                day = self.today[tenant]
                day.spend += ev.cost_usd
                day.tokens += tokens
            elif ev.error is not None:
                where = f"{ev.step_id}@{t.deployment}"
                why = f"{ev.error.cls}: {ev.error.message}"
                self.failures.appendleft(Failure(at_ms, tenant, chain_id, where, why))
        elif kind.startswith("chain."):
            self.today[tenant].ended += kind != "chain.rejected"
            if kind == "chain.failed":
                end = _decode(_chain_failure, data)
                if end is not None:
                    where = f"chain ({end.step_id})" if end.step_id else "chain"
                    self.failures.appendleft(Failure(at_ms, tenant, chain_id, where, end.reason))

    # -- output ----------------------------------------------------------------------------

    def snapshot(self, now_ms: int) -> Snapshot:
        while self.samples and self.samples[0].at_ms < now_ms - WINDOW_MS:
            self.samples.popleft()
        return Snapshot(
            at_ms=now_ms,
            pools=self._pools(now_ms),
            deployments=self._deployments(now_ms),
            tenants=self._tenants(now_ms),
            failures=list(self.failures),
            events=self.events,
        )

    def _pools(self, now_ms: int) -> list[PoolRow]:
        live: dict[str, list[_Heartbeat]] = defaultdict(list)
        for hb in self.heartbeats.values():
            if now_ms - hb.at_ms <= STALE_BEATS * max(hb.interval_ms, 1):
                live[hb.pool].append(hb)
        latencies: dict[str, list[float]] = defaultdict(list)
        failed: dict[str, int] = defaultdict(int)
        for s in self.samples:
            if s.ok:
                latencies[s.pool].append(s.latency_ms)
            else:
                failed[s.pool] += 1
        names = set(live) | set(self.queues) | set(latencies) | set(failed)
        rows = []
        for pool in sorted(names):
            beats = live.get(pool, [])
            lat = sorted(latencies.get(pool, []))
            calls = len(lat) + failed.get(pool, 0)
            deps = {d for hb in beats for d in hb.deployments}
            deps |= {d for d, p in self.pool_of.items() if p == pool}
            pending, acks = self.queues.get(pool, (0, 0))
            rows.append(
                PoolRow(
                    pool=pool,
                    workers=len(beats),
                    slots_free=sum(hb.slots_free for hb in beats),
                    slots_total=sum(hb.slots_total for hb in beats),
                    queued=pending,
                    in_flight=acks,
                    p50_ms=_percentile(lat, 0.50),
                    p95_ms=_percentile(lat, 0.95),
                    error_rate=failed.get(pool, 0) / calls if calls else None,
                    breaker=self._worst_breaker(deps),
                    headroom=_headroom(beats),
                )
            )
        return rows

    def _worst_breaker(self, deployments: set[str]) -> str:
        states = [self.breakers[d].status for d in deployments if d in self.breakers]
        return max(states, key=lambda s: BREAKER_RANK.get(s, 2), default="closed")

    def _deployments(self, now_ms: int) -> list[DeploymentRow]:
        calls: dict[str, int] = defaultdict(int)
        tokens: dict[str, int] = defaultdict(int)
        cost: dict[str, float] = defaultdict(float)
        for s in reversed(self.samples):
            if s.at_ms < now_ms - MINUTE_MS:
                break
            calls[s.deployment] += 1
            tokens[s.deployment] += s.tokens
            cost[s.deployment] += s.cost
        names = set(self.pool_of) | set(self.breakers)
        return [
            DeploymentRow(
                deployment=d,
                pool=self.pool_of.get(d, "-"),
                calls_per_min=calls.get(d, 0),
                tokens_per_min=tokens.get(d, 0),
                cost_per_min=cost.get(d, 0.0),
                breaker=self.breakers[d].status if d in self.breakers else "closed",
            )
            for d in sorted(names)
        ]

    def _tenants(self, now_ms: int) -> list[TenantRow]:
        running: dict[str, int] = defaultdict(int)
        for tenant in self.running.values():
            running[tenant] += 1
        today = self.today if now_ms // DAY_MS == self.day else {}
        return [
            TenantRow(
                tenant=t,
                running=running.get(t, 0),
                chains_today=today[t].ended if t in today else 0,
                spend_today=today[t].spend if t in today else 0.0,
                tokens_today=today[t].tokens if t in today else 0,
            )
            for t in sorted(set(running) | set(today))
        ]


def _decode(decoder: msgspec.json.Decoder[object], data: bytes | None) -> object | None:
    try:
        return decoder.decode(data or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # not top's to judge: the ledger and the dead letters report bad messages


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of an ascending list; None for no values."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 1))  # ceil(n * q), at least the first
    return sorted_values[int(rank) - 1]


def _headroom(beats: list[_Heartbeat]) -> str:
    """The least the provider said is left, over the pool's workers and deployments."""
    req = [h.remaining_requests for hb in beats for h in hb.deployments.values()]
    tok = [h.remaining_tokens for hb in beats for h in hb.deployments.values()]
    reqs = [r for r in req if r is not None]
    toks = [t for t in tok if t is not None]
    if not reqs and not toks:
        return "-"
    parts = []
    if reqs:
        parts.append(f"{_short(min(reqs))} req")
    if toks:
        parts.append(f"{_short(min(toks))} tok")
    return " ".join(parts)


def _short(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
