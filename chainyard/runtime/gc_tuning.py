"""Garbage-collector settings for a service process (router, worker, dev stack).

Every step allocates a few thousand objects, and with CPython's default thresholds each full
collection walked every object alive (~12% of a worker's CPU). What start-up made is frozen and
young objects are collected less often; a worker, whose calls in flight survive every young
collection, less often still. docs/DESIGN-NOTES.md #16 has the figures.
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
