"""The load driver both paths share: submit keys under a fixed in-flight window, count completions.

The system under test calls `Completions.done(key)` (from a subscription callback) when a
key's result arrives; a window slot frees only then. Nothing sleeps: the driver waits on a
semaphore and on an event, each with a deadline.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile (1-99), interpolated between samples; NaN for no samples."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(p) - 1]


class BenchError(RuntimeError):
    """A run failed or did not finish in time."""


class Completions:
    """Completion times by key, and a semaphore slot given back for each."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self._window: asyncio.Semaphore | None = None
        self._expect = 0
        self._all = asyncio.Event()

    def arm(self, keys: list[str], window: int) -> asyncio.Semaphore:
        self.started.clear()
        self.finished.clear()
        self.failed.clear()
        self._expect = len(keys)
        self._all = asyncio.Event()
        self._window = asyncio.Semaphore(window)
        return self._window

    def done(self, key: str, error: str | None = None) -> None:
        if key not in self.started or key in self.finished:
            return  # a warm-up leftover or a duplicate: not ours
        self.finished[key] = time.perf_counter()
        if error is not None:
            self.failed[key] = error
        if self._window is not None:
            self._window.release()
        if len(self.finished) >= self._expect:
            self._all.set()

    async def wait_all(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._all.wait(), timeout_s)
        except TimeoutError:
            raise BenchError(
                f"only {len(self.finished)}/{self._expect} completed within {timeout_s:.0f} s"
            ) from None


@dataclass
class Run:
    n: int
    window: int
    elapsed_s: float
    latencies_ms: list[float]

    @property
    def per_s(self) -> float:
        return self.n / self.elapsed_s

    def pct(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    def summary(self) -> dict[str, float]:
        return {
            "n": self.n,
            "window": self.window,
            "elapsed_s": round(self.elapsed_s, 4),
            "per_s": round(self.per_s, 1),
            "p50_ms": round(self.pct(50), 4),
            "p99_ms": round(self.pct(99), 4),
        }


Submit = Callable[[str], Awaitable[None]]


async def drive(
    keys: list[str], submit: Submit, completions: Completions, window: int, timeout_s: float
) -> Run:
    """Submit every key with at most `window` in flight; return when all have completed."""
    sem = completions.arm(keys, window)
    pending: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def reap(t: asyncio.Task[None]) -> None:
        pending.discard(t)
        if not t.cancelled() and t.exception() is not None:
            errors.append(t.exception())  # type: ignore[arg-type]

    deadline = time.monotonic() + timeout_s
    t0 = time.perf_counter()
    try:
        for key in keys:
            try:
                await asyncio.wait_for(sem.acquire(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise BenchError(f"window never freed: {len(completions.finished)} done") from None
            if errors:
                raise BenchError(f"submit failed: {errors[0]!r}") from errors[0]
            completions.started[key] = time.perf_counter()
            t = asyncio.create_task(submit(key))
            pending.add(t)
            t.add_done_callback(reap)
        await completions.wait_all(max(deadline - time.monotonic(), 0.001))
    finally:
        for t in list(pending):
            t.cancel()
    if errors:
        raise BenchError(f"submit failed: {errors[0]!r}") from errors[0]
    if completions.failed:
        key, why = next(iter(completions.failed.items()))
        raise BenchError(f"{len(completions.failed)} failed, e.g. {key}: {why}")
    elapsed = max(completions.finished.values()) - t0
    lat = [(completions.finished[k] - completions.started[k]) * 1000 for k in keys]
    return Run(n=len(keys), window=window, elapsed_s=elapsed, latencies_ms=lat)
