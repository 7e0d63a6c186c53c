"""A KV bucket followed into memory: the routers' breakers and capacity, the gateway's keys and
limit counters.

A watch goes quiet when its server restarts, and nats-py makes it again only ~20 s later, so
the view checks the bucket's last revision every CHECK_S and, when it is ahead of what was
applied at two checks in a row, watches again from the start (docs/DESIGN-NOTES.md #26)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Self

from nats.js.kv import KV_PURGE, KeyValue

log = logging.getLogger("chainyard.kv")

CHECK_S = 0.5  # a stalled watch is found and replaced within about 2 x this


class KvView:
    """Passes every entry of `kv` to `apply` (a value, or a delete or purge of its key, in
    bucket order) from a watch; `start` returns once the entries that existed are applied, and
    later ones follow within milliseconds."""

    def __init__(self, kv: KeyValue, bucket: str, apply: Callable[[KeyValue.Entry], None]) -> None:
        self.kv = kv
        self.bucket = bucket  # for logs
        self._on_entry = apply
        self.revision = 0  # the last bucket revision applied
        self._live: set[str] = set()  # keys with a value
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []  # following, checking
        self._loaded: asyncio.Future[None]  # set once the first watch has shown every entry

    async def start(self) -> Self:
        self._loaded = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._check())]
        try:
            await self._loaded
        except BaseException:
            await self.stop()
            raise
        return self

    async def _follow(self) -> None:
        """Watch the bucket; again after a failure. `_check` replaces this task when it stalls."""
        while True:
            try:
                watcher = await self.kv.watchall()
                try:
                    await self._updates(watcher)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the server went away mid-watch: watch again
                if not self._loaded.done():
                    self._loaded.set_exception(e)
                    return
                log.warning("watch on %s ended (%s); watching again", self.bucket, e)
                await asyncio.sleep(CHECK_S)

    async def _updates(self, watcher: KeyValue.KeyWatcher) -> None:
        seen: set[str] | None = set()  # the keys this watch showed, until its first None
        async for entry in watcher:
            if entry is not None:
                if seen is not None:
                    seen.add(entry.key)
                self._take(entry)
            elif seen is not None:  # the entries that existed are all in
                for gone in self._live - seen:  # removed while no watch was on
                    self._take(KeyValue.Entry(
                        bucket="", key=gone, value=None, revision=None, delta=None, created=None,
                        operation=KV_PURGE,
                    ))  # fmt: skip
                seen = None
                if not self._loaded.done():
                    self._loaded.set_result(None)
            async with self._changed:
                self._changed.notify_all()

    def _take(self, entry: KeyValue.Entry) -> None:
        self.revision = max(self.revision, entry.revision or 0)
        if entry.operation is None and entry.value:
            self._live.add(entry.key)
        else:
            self._live.discard(entry.key)
        self._on_entry(entry)

    async def _check(self) -> None:
        stalled_at = -1  # the revision applied when the bucket was last seen ahead of it
        while True:
            await asyncio.sleep(CHECK_S)  # a period, not a wait for an event
            try:
                ahead = await self.bucket_revision() > self.revision
            except Exception:
                continue
            if not ahead:
                stalled_at = -1
            elif stalled_at == self.revision:  # ahead twice, nothing applied in between
                log.warning(
                    "watch on %s stalled at revision %d; watching again", self.bucket, self.revision
                )
                stalled_at = -1
                self._tasks[0].cancel()  # its watch stops
                self._tasks[0] = asyncio.create_task(self._follow())
            else:
                stalled_at = self.revision

    async def until(self, check: Callable[[Self], bool]) -> None:
        """Wait until `check(self)` holds after an update (bound it with a timeout); e.g. until
        `revision` reaches a write's."""
        async with self._changed:
            await self._changed.wait_for(lambda: check(self))

    async def bucket_revision(self) -> int:
        """The bucket's last revision now: once `revision` reaches it, this view has every write
        made before the call."""
        return (await self.kv.status()).stream_info.state.last_seq

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
