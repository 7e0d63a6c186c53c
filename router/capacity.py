"""The live capacity view: worker heartbeats from KV, plus what this router sent since."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from nats.js.kv import KeyValue

from chainyard.contracts import DecodeError, Heartbeat, ValidationError, heartbeat_decoder

log = logging.getLogger("chainyard.router.capacity")
STALE_AFTER_INTERVALS = 3


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class CapacityView:
    """Free slots per pool, as the workers last reported them, less this router's dispatches since.

    A heartbeat older than three of its own intervals counts as no capacity (its worker is gone
    or stuck). The KV bucket's TTL removes it for good.
    """

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._beats: dict[str, Heartbeat] = {}  # key "<pool>.<worker>" -> latest
        self._sent: defaultdict[str, int] = defaultdict(int)  # pool -> dispatched since beats
        self._seen_pools: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), 5.0)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self._kv.watchall()
                async for entry in watcher:
                    if entry is None:  # end of the initial values
                        self._ready.set()
                        continue
                    self._apply(entry.key, entry.value, entry.operation)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a server restart ends the watch: start a new one
                log.warning("capacity watch restarting: %s", e)
                await asyncio.sleep(0.5)

    def _apply(self, key: str, value: bytes | None, op: str | None) -> None:
        if op in ("DEL", "PURGE") or not value:
            self._beats.pop(key, None)
            return
        try:
            hb = heartbeat_decoder.decode(value)
        except (DecodeError, ValidationError):
            log.warning("ignoring malformed heartbeat under %s", key)
            return
        self._beats[key] = hb
        self._seen_pools.add(hb.pool)
        self._sent[hb.pool] = 0  # the worker's count now includes what we sent before

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
        return sum(hb.slots_free for hb in self.fresh(pool)) - self._sent[pool]

    def has_workers(self, pool: str) -> bool:
        return bool(self.fresh(pool))

    def note_dispatch(self, pool: str) -> None:
        self._sent[pool] += 1
