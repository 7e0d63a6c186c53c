"""`chainyard top`'s reading side: feeds a `Feed` (top_model.py) from what NATS already holds.

Only readers, so the view costs the data path nothing: ordered consumers (no acks, no durable
state) on the KV buckets' streams (`cy_capacity` heartbeats, `cy_breakers`, `cy_chains`) and on
the event log from midnight UTC, plus a poll of the pool consumers' info once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from chainyard.contracts import Topology
from chainyard.ordered import OrderedReader, follow
from chainyard.top_model import Feed

POLL_S = 1.0
DELETED = ("DEL", "PURGE")


def _kv_value(msg: Msg) -> bytes | None:
    """The entry's value; None for a deleted or purged key."""
    if (msg.headers or {}).get("KV-Operation") in DELETED or not msg.data:
        return None
    return msg.data


def midnight_utc(now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


class Sources:
    """Start with `start()`; `ready` is done once everything stored has been read."""

    def __init__(self, nc: NatsClient, feed: Feed, topology: Topology | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.feed = feed
        self.topology = topology or Topology()
        self._readers: list[OrderedReader] = []
        self._poller: asyncio.Task[None] | None = None
        self.ready: asyncio.Future[Any] | None = None

    async def start(self, since: datetime | None = None) -> asyncio.Future[Any]:
        """Start reading (the event log from `since`, default midnight UTC); returns `ready`."""
        self.feed.prefix = self.topology.subjects.prefix
        await self.poll_queues()
        self._poller = asyncio.create_task(self._poll())
        self.ready = asyncio.ensure_future(self._read_all(since or midnight_utc()))
        return self.ready

    async def _read_all(self, since: datetime) -> None:
        """Each source's history in turn, then its live messages: one history at a time, as
        several at once outrun a reader (the server cuts a connection more than 64 MB behind,
        flow control or not)."""
        feed, topo = self.feed, self.topology

        async def read(stream: str, subject: str, on_msg: Callable[[Msg], None], **kw: Any) -> None:
            with contextlib.suppress(NotFoundError):  # a bucket no service has made yet
                reader, done = await follow(
                    self.nc, self.js, stream, subject, on_msg, flow_control=True, **kw
                )
                self._readers.append(reader)
                await done

        def kv(bucket: str, apply: Callable[[str, bytes | None], None]) -> Awaitable[None]:
            prefix = f"$KV.{bucket}."

            def on_msg(msg: Msg) -> None:
                apply(msg.subject.removeprefix(prefix), _kv_value(msg))

            return read(f"KV_{bucket}", f"{prefix}>", on_msg, last_per_subject=True)

        def on_event(msg: Msg) -> None:
            at = msg.metadata.timestamp
            feed.on_event(msg.subject, msg.data, int(at.timestamp() * 1000) if at else 0)

        await kv(topo.capacity_kv.bucket, feed.on_heartbeat)
        await kv(topo.breakers_kv.bucket, feed.on_breaker)
        await kv(topo.chains_kv.bucket, feed.on_chain)
        await read(topo.events.name, topo.subjects.all_events, on_event, since=since)

    async def poll_queues(self) -> None:
        """Pending and ack-pending of every pool's consumer (num_pending, num_ack_pending)."""
        work = self.topology.work.name
        head = self.topology.subjects.work("")
        with contextlib.suppress(Exception):  # no work stream yet: no pools to show
            for info in await self.js.consumers_info(work):
                subject = info.config.filter_subject or ""
                if subject.startswith(head):
                    pool = subject.removeprefix(head)
                    self.feed.on_queue(pool, info.num_pending or 0, info.num_ack_pending or 0)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            await self.poll_queues()

    async def stop(self) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.cancel()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for reader in self._readers:
            await reader.stop()
        self._readers.clear()
