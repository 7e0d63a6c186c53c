"""Garbage-collector settings for a service process (router, worker, dev stack).

Every step allocates a few thousand objects, so with CPython's default thresholds (700, 10, 10)
the collector ran about once a step, and each full collection walked every module, class and
connection object, plus the router's cache of chain states (~0.1 s for 10,000 cached chains on
the 2-core machine this is built on: a latency spike for whatever was waiting). This cost ~12%
of a worker's CPU at 256 slots. What exists after start-up is frozen (never walked again), and
young collections come every 20,000 allocations. Reference counting still frees at once
everything that is not in a reference cycle; only cycles wait longer.

A worker process collects young objects five times less often: the state of each call in flight
(its task, coroutines, futures, message, assignment) lives as long as the provider takes, so it
survives every young collection made meanwhile and each one walks all of it for nothing. With
10,000 calls of 1 s in flight, young collections every 20,000 allocations took ~15% of the
worker's CPU; every 100,000, ~6%. A young collection then walks at most ~100,000 objects
(~10-20 ms), a small pause beside calls that take a second; the router keeps the shorter one.
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 50, 100)
WORKER_THRESHOLDS = (100_000, 50, 100)


def tune_gc(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Freeze what start-up made and collect less often. Process-wide; calling again is harmless."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
