"""What a worker has seen of each deployment: latency, errors, rate limits, throttling."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from chainyard.contracts import DeploymentHealth, now_ms

from .providers._base import ProviderError, RateLimits

ALPHA = 0.2  # EWMA weight of the newest observation


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


class _Seen:
    __slots__ = ("calls", "error_rate", "latency_ms", "limits", "ttft_ms")

    def __init__(self) -> None:
        self.calls = 0
        self.latency_ms: float | None = None
        self.ttft_ms: float | None = None
        self.error_rate = 0.0
        self.limits: RateLimits | None = None


class Health:
    """Per-deployment observations, reported in every heartbeat.

    After a 429 the whole worker stops fetching until the provider's reset (or Retry-After):
    hammering a throttled provider only makes the throttling longer.
    """

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self.throttled_until_ms = 0

    def _get(self, deployment: str) -> _Seen:
        s = self._seen.get(deployment)
        if s is None:
            s = self._seen[deployment] = _Seen()
        return s

    def record_success(
        self,
        deployment: str,
        latency_ms: float,
        ttft_ms: float | None,
        limits: RateLimits | None = None,
    ) -> None:
        s = self._get(deployment)
        s.calls += 1
        s.latency_ms = _ewma(s.latency_ms, latency_ms)
        if ttft_ms is not None:
            s.ttft_ms = _ewma(s.ttft_ms, ttft_ms)
        s.error_rate = _ewma(s.error_rate, 0.0)
        if limits is not None:
            s.limits = limits

    def record_failure(self, deployment: str, e: ProviderError, latency_ms: float) -> None:
        s = self._get(deployment)
        s.calls += 1
        s.error_rate = _ewma(s.error_rate, 1.0)
        if e.limits is not None:
            s.limits = e.limits
        if e.status == 429:
            until = now_ms() + int((e.retry_after_s or 1.0) * 1000)
            if e.limits and e.limits.reset_requests_at_ms and e.retry_after_s is None:
                until = max(until, e.limits.reset_requests_at_ms)
            self.throttled_until_ms = max(self.throttled_until_ms, until)

    def gate(self) -> Awaitable[None] | None:
        """For consume(): None while not throttled (no task, no wait), else the wait."""
        return self.wait_unthrottled() if self.throttled_until_ms > now_ms() else None

    async def wait_unthrottled(self) -> None:
        wait = self.throttled_until_ms - now_ms()
        while wait > 0:  # a later 429 may have pushed the end out: look again after each sleep
            await asyncio.sleep(wait / 1000)
            wait = self.throttled_until_ms - now_ms()

    def snapshot(self) -> dict[str, DeploymentHealth]:
        out = {}
        throttled = self.throttled_until_ms if self.throttled_until_ms > now_ms() else None
        for name, s in self._seen.items():
            lim = s.limits or RateLimits()
            out[name] = DeploymentHealth(
                remaining_requests=lim.remaining_requests,
                remaining_tokens=lim.remaining_tokens,
                reset_requests_at_ms=lim.reset_requests_at_ms,
                reset_tokens_at_ms=lim.reset_tokens_at_ms,
                throttled_until_ms=throttled,
                latency_ms=s.latency_ms,
                ttft_ms=s.ttft_ms,
                error_rate=round(s.error_rate, 4),
                calls=s.calls,
            )
        return out
