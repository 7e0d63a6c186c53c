"""The live capacity view: worker heartbeats from KV, plus what this router sent since.

Per pool: the fresh heartbeats' free slots, less this router's dispatches since the last beat,
less the pool consumer's backlog (num_pending, polled about once a second). Per deployment:
latency, time to first token, error rate and throttling as the pool's workers report them,
merged over the fresh heartbeats. A pool with no fresh heartbeat has no capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nats.js.kv import KeyValue

from chainyard.contracts import (
    DecodeError,
    Heartbeat,
    ToolSpec,
    ValidationError,
    heartbeat_decoder,
    now_ms,
)
from chainyard.runtime.kv_view import KvView
from chainyard.runtime.nats import retry_api

log = logging.getLogger("chainyard.router.capacity")
STALE_AFTER_INTERVALS = 3
ALWAYS = 2**62  # live_until_ms of a pool that scales to zero: its queue is where work waits
# backlog(pool) -> (num_pending, num_ack_pending) of the pool's durable consumer
BacklogSource = Callable[[str], Awaitable[tuple[int, int]]]


@dataclass(slots=True)
class PoolLoad:
    """What a pool can take now, as far as this router knows."""

    live_until_ms: int = 0  # the freshest heartbeat goes stale then
    slots_total: int = 0
    slots_free: int = 0
    pending: int = 0  # consumer backlog: not yet fetched by any worker
    ack_pending: int = 0

    def live(self, t: int) -> bool:
        return t <= self.live_until_ms


@dataclass(slots=True)
class DeploymentStats:
    latency_ms: float | None = None
    ttft_ms: float | None = None
    error_rate: float = 0.0
    throttled_until_ms: int = 0
    calls: int = 0


class _Tracked(dict):  # type: ignore[type-arg]
    """A dict that bumps its view's `version` on every write, so views derived from it (the
    policy's live snapshots) see an entry replaced from anywhere, not only from `_recompute`."""

    __slots__ = ("_view",)

    def __init__(self, view: CapacityView) -> None:
        super().__init__()
        self._view = view

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._view.version += 1

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._view.version += 1

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, key: Any, *default: Any) -> Any:
        self._view.version += 1
        return super().pop(key, *default)

    def popitem(self) -> tuple[Any, Any]:
        self._view.version += 1
        return super().popitem()

    def update(self, *args: Any, **kw: Any) -> None:
        super().update(*args, **kw)
        self._view.version += 1

    def clear(self) -> None:
        super().clear()
        self._view.version += 1


class CapacityView:
    """Free slots per pool, as the workers last reported them, less this router's dispatches since.

    A heartbeat older than three of its own intervals counts as no capacity (its worker is gone
    or stuck). The KV bucket's TTL removes it for good.
    """

    def __init__(
        self,
        kv: KeyValue,
        backlog: BacklogSource | None = None,
        poll_s: float = 1.0,
        wakeable: Iterable[str] = (),
    ) -> None:
        """`wakeable`: pools scaled to zero (`scale.min_replicas = 0`). They count as live with
        no free slot while no worker runs, so their work is queued: the queue's lag is what
        wakes them (KEDA), where skipping them would leave the step waiting for a worker that
        nothing starts."""
        self._kv = kv
        self._beats: dict[str, Heartbeat] = {}  # key "<pool>.<worker>" -> latest
        self._sent: defaultdict[str, int] = defaultdict(int)  # pool -> dispatched since beats
        self._seen_pools: set[str] = set()
        self.tool_specs: dict[str, ToolSpec] = {}  # what tool workers advertise, for agent loops
        self.version = 0  # bumped on every change: lets callers cache derived views
        # Writes bump `version`; a PoolLoad's figures (free slots, backlog) may change in place
        # and are read on every pick, its liveness only changes with a version bump.
        self.pools: dict[str, PoolLoad] = _Tracked(self)
        self.stats: dict[str, DeploymentStats] = _Tracked(self)
        self.changed = asyncio.Event()  # set on every change; waiters clear it
        self._backlog = backlog
        self._poll_s = poll_s
        self._tasks: list[asyncio.Task[None]] = []
        self._view: KvView | None = None  # the heartbeats, followed across server restarts
        self._wakeable = frozenset(wakeable)
        for pool in self._wakeable:
            self._seen_pools.add(pool)
            self.pools[pool] = PoolLoad(live_until_ms=ALWAYS)

    def poll_backlog(self, source: BacklogSource, period_s: float) -> None:
        """Poll each seen pool's consumer backlog every `period_s` (set before `start`)."""
        self._backlog, self._poll_s = source, period_s

    async def start(self) -> None:
        view = KvView(
            self._kv, "capacity", apply=lambda e: self._apply(e.key, e.value, e.operation)
        )
        self._view = await retry_api(view.start)
        if self._backlog is not None:
            self._tasks.append(asyncio.create_task(self._poll()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._view is not None:
            await self._view.stop()

    async def _poll(self) -> None:
        """Consumer backlog per pool: one cheap consumer-info request per pool per period."""
        assert self._backlog is not None
        while True:
            await asyncio.sleep(self._poll_s)
            for pool in list(self._seen_pools):
                try:
                    pending, ack_pending = await self._backlog(pool)
                except asyncio.CancelledError:
                    raise
                except Exception:  # no consumer yet, a leader election: keep the last figure
                    continue
                load = self.pools.setdefault(pool, PoolLoad())
                load.pending, load.ack_pending = pending, ack_pending
            self._recompute_all()

    def _apply(self, key: str, value: bytes | None, op: str | None) -> None:
        if op in ("DEL", "PURGE") or not value:
            hb = self._beats.pop(key, None)
            if hb is not None:
                self._recompute(hb.pool)
            return
        try:
            hb = heartbeat_decoder.decode(value)
        except (DecodeError, ValidationError):
            log.warning("ignoring malformed heartbeat under %s", key)
            return
        self._beats[key] = hb
        self._seen_pools.add(hb.pool)
        for spec in hb.tools:
            self.tool_specs[spec.name] = spec
        self._sent[hb.pool] = 0  # the worker's count now includes what we sent before
        self._recompute(hb.pool)

    def _recompute_all(self) -> None:
        for pool in list(self._seen_pools):
            self._recompute(pool)

    def _recompute(self, pool: str) -> None:
        """Merge the pool's fresh heartbeats into its load and its deployments' stats."""
        t = now_ms()
        beats = self.fresh(pool, t)
        load = self.pools.setdefault(pool, PoolLoad())
        load.slots_total = sum(hb.slots_total for hb in beats)
        load.slots_free = sum(hb.slots_free for hb in beats)
        load.live_until_ms = max(
            (hb.at_ms + STALE_AFTER_INTERVALS * hb.interval_ms for hb in beats), default=0
        )
        if pool in self._wakeable:
            load.live_until_ms = ALWAYS
        merged: dict[str, list] = {}
        for hb in beats:
            for name, h in hb.deployments.items():
                merged.setdefault(name, []).append(h)
        for name, hs in merged.items():
            calls = sum(h.calls for h in hs) or 1
            lat = [(h.latency_ms, h.calls or 1) for h in hs if h.latency_ms is not None]
            ttft = [(h.ttft_ms, h.calls or 1) for h in hs if h.ttft_ms is not None]
            self.stats[name] = DeploymentStats(
                latency_ms=sum(v * w for v, w in lat) / sum(w for _, w in lat) if lat else None,
                ttft_ms=sum(v * w for v, w in ttft) / sum(w for _, w in ttft) if ttft else None,
                error_rate=sum(h.error_rate * (h.calls or 1) for h in hs) / calls,
                # one throttled worker of the pool does not stop the others; all of them do
                throttled_until_ms=min(h.throttled_until_ms or 0 for h in hs),
                calls=sum(h.calls for h in hs),
            )
        self.version += 1
        self.changed.set()

    def seen(self, pool: str) -> bool:
        return pool in self._seen_pools

    def fresh(self, pool: str, at_ms: int | None = None) -> list[Heartbeat]:
        t = at_ms or now_ms()
        return [
            hb
            for hb in self._beats.values()
            if hb.pool == pool
            and not hb.draining
            and t - hb.at_ms <= STALE_AFTER_INTERVALS * hb.interval_ms
        ]

    def free_slots(self, pool: str) -> int:
        load = self.pools.get(pool)
        if load is None or not load.live(now_ms()):
            return 0
        return load.slots_free - max(self._sent[pool], load.pending)

    def has_workers(self, pool: str) -> bool:
        load = self.pools.get(pool)
        return load is not None and load.live(now_ms())

    def outstanding(self, pool: str) -> int:
        """What this router sent to `pool` since its last heartbeat."""
        return self._sent[pool]

    def note_dispatch(self, pool: str) -> None:
        self._sent[pool] += 1

    def note_result(self, pool: str) -> None:
        """A step of `pool` reported back: it no longer holds a slot."""
        if self._sent[pool] > 0:
            self._sent[pool] -= 1
