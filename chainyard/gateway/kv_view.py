"""A KV bucket followed into memory: the shared part of the key store and the limit counters."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Self

from nats.js.kv import KeyValue


class KvView:
    """Applies every entry of `kv` (`_apply`, in bucket order) from a watch; `open` returns once
    the entries that existed are applied, and later ones follow within milliseconds."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.revision = 0  # the last bucket revision applied
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None

    def _apply(self, entry: KeyValue.Entry) -> None:
        raise NotImplementedError

    async def _start(self) -> Self:
        self._watcher = await self.kv.watchall()
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._follow(self._watcher, loaded))
        await loaded
        return self

    async def _follow(self, watcher: KeyValue.KeyWatcher, loaded: asyncio.Future[None]) -> None:
        async for entry in watcher:
            if entry is None:  # the entries that existed are all in
                if not loaded.done():
                    loaded.set_result(None)
                continue
            self.revision = max(self.revision, entry.revision or 0)
            self._apply(entry)
            async with self._changed:
                self._changed.notify_all()

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
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
