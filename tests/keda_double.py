"""A test double of KEDA's `nats-jetstream` scaler and the HPA behind it, over real processes.

What KEDA does (pkg/scalers/nats_jetstream_scaler.go, v2.x): it GETs the NATS monitoring
endpoint `/jsz?acc=<account>&consumers=true&config=true`, finds the account, the stream and the
consumer, and reports lag = the consumer's `num_pending + num_ack_pending` (the stream's
`last_seq` when the consumer is not there). The scaler is active while lag >
activationLagThreshold. The HPA's target is an AverageValue of lagThreshold per replica, so it
wants ceil(lag / lagThreshold) replicas (kept as they are within its 10 % tolerance), bounded
by min and max; KEDA itself takes the workload from 0 to 1 on activation and back to 0
(minReplicaCount 0) after cooldownPeriod of inactivity. The HPA's `behavior` limits how fast:
here scale-up adds at most `up_pods` per `up_period_s` and scale-down removes at most one per
`down_period_s` after a stabilization window (the highest recommendation in it wins).

Scaling is starting `chainyard worker` processes and sending SIGTERM to the newest (a
terminating pod stops counting as a replica at once, as in a ReplicaSet).
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

HPA_TOLERANCE = 0.1  # kube-controller-manager's --horizontal-pod-autoscaler-tolerance default


@dataclass(frozen=True)
class ScaledObject:
    """The ScaledObject fields (and HPA behavior) the double honours."""

    monitoring: str  # http://host:port of the NATS monitoring endpoint
    stream: str
    consumer: str
    lag_threshold: int
    account: str = "$G"  # no accounts configured
    activation_lag_threshold: int = 0
    min_replicas: int = 0
    max_replicas: int = 100
    polling_interval_s: float = 0.25
    cooldown_s: float = 2.0
    up_pods: int = 1
    up_period_s: float = 3.0
    down_stabilization_s: float = 1.0
    down_period_s: float = 1.0


@dataclass(frozen=True)
class Lag:
    pending: int  # num_pending: in the stream, not delivered yet
    ack_pending: int  # num_ack_pending: delivered, not acknowledged (in flight)

    @property
    def total(self) -> int:
        return self.pending + self.ack_pending


def read_lag(so: ScaledObject) -> Lag:
    """The consumer's lag exactly as KEDA reads it, from the monitoring endpoint."""
    url = f"{so.monitoring}/jsz?acc={so.account}&consumers=true&config=true"
    with urllib.request.urlopen(url, timeout=2) as r:
        jsz = json.loads(r.read())
    for acc in jsz.get("account_details") or []:
        if acc.get("name") != so.account:
            continue
        for st in acc.get("stream_detail") or []:
            if st.get("name") != so.stream:
                continue
            for c in st.get("consumer_detail") or []:
                if c.get("name") == so.consumer:
                    return Lag(c.get("num_pending", 0), c.get("num_ack_pending", 0))
            return Lag(st["state"]["last_seq"], 0)  # KEDA's fallback: the stream's last seq
    raise LookupError(f"stream {so.stream} not in {url}")


def hpa_desired(lag: int, current: int, so: ScaledObject) -> int:
    """The HPA's recommendation for an AverageValue target of lag_threshold per replica."""
    low = max(so.min_replicas, 1)
    if current == 0:
        return min(max(math.ceil(lag / so.lag_threshold), low), so.max_replicas)
    ratio = lag / (so.lag_threshold * current)
    want = current if abs(ratio - 1.0) <= HPA_TOLERANCE else math.ceil(lag / so.lag_threshold)
    return min(max(want, low), so.max_replicas)


@dataclass
class Tick:
    t: float
    lag: Lag
    desired: int  # what KEDA + HPA want now
    replicas: int  # running, not terminating, after this tick's action
    ready: int  # of those, with a heartbeat in the capacity bucket


@dataclass
class Keda:
    """Runs the loop: `async with Keda(...) as k:` ... then `k.ticks`, `k.stopped`."""

    so: ScaledObject
    start: Callable[[], Awaitable[asyncio.subprocess.Process]]
    ready_pids: Callable[[], Awaitable[set[int]]]  # pids with a live heartbeat
    replicas: list[asyncio.subprocess.Process] = field(default_factory=list)
    stopped: list[asyncio.subprocess.Process] = field(default_factory=list)  # SIGTERMed
    ticks: list[Tick] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # failed reads of the endpoint
    _task: asyncio.Task[None] | None = None
    _last_up: float = -math.inf
    _last_down: float = -math.inf
    _last_active: float = -math.inf
    _recent: list[tuple[float, int]] = field(default_factory=list)

    async def __aenter__(self) -> Keda:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except (OSError, LookupError) as e:  # KEDA logs it and keeps the replicas it has
                self.errors.append(repr(e))
            await asyncio.sleep(self.so.polling_interval_s)  # KEDA's pollingInterval

    async def tick(self) -> None:
        so, now = self.so, time.monotonic()
        lag = await asyncio.to_thread(read_lag, so)
        active = lag.total > so.activation_lag_threshold
        if active:
            self._last_active = now
        n = len(self.replicas)
        if n == 0:
            want = hpa_desired(lag.total, 0, so) if active else so.min_replicas
        elif not active and so.min_replicas == 0 and now - self._last_active >= so.cooldown_s:
            want = 0  # KEDA's scale to zero after cooldownPeriod
        else:
            want = hpa_desired(lag.total, n, so)
        # Scale-down stabilization: the highest recommendation of the window wins.
        self._recent = [(t, w) for t, w in self._recent if now - t <= so.down_stabilization_s]
        self._recent.append((now, want))
        if want < n:
            want = max(w for _, w in self._recent)
        if want > n and now - self._last_up >= so.up_period_s:
            for _ in range(min(want - n, so.up_pods)):
                self.replicas.append(await self.start())
            self._last_up = now
        elif want < n and now - self._last_down >= so.down_period_s:
            victim = self.replicas.pop()  # the newest, as a ReplicaSet picks the youngest pod
            victim.send_signal(signal.SIGTERM)
            self.stopped.append(victim)
            self._last_down = now
        pids = await self.ready_pids()
        ready = sum(p.pid in pids for p in self.replicas)
        self.ticks.append(Tick(now, lag, want, len(self.replicas), ready))

    def line(self) -> str:
        """The replica timeline, compressed: `t=+1.2s lag=40 replicas=2 ready=1`, on change."""
        out, last = [], None
        t0 = self.ticks[0].t if self.ticks else 0.0
        for k in self.ticks:
            key = (k.replicas, k.ready, k.lag.total // max(self.so.lag_threshold, 1))
            if key != last:
                out.append(f"t=+{k.t - t0:.1f}s lag={k.lag.total} replicas={k.replicas}/{k.ready}")
                last = key
        return "; ".join(out)
