"""Reading a stream in order without touching it: the client's history reads, `usage`, `top`.

`OrderedReader` pushes the messages of a stream on one filter, in order, to `on_msg`: the
stored ones (all, the last per subject, from a sequence or from a time), then the live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

FLOW_HEARTBEAT_S = 5.0


class OrderedReader:
    """The consumer is made with a name, so its create request carries the filter in its
    subject (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`) and a tenant's permissions can
    pin it to the tenant's own subjects (deploy/accounts.conf); `js.subscribe` sends the
    unscoped form, and looks the stream up. It is ephemeral (the server drops it 5 s after this
    stops) and needs no acks. A gap in its sequence (messages dropped on a reconnect) starts a
    new consumer after the last message passed on, as nats.py's ordered consumer does.

    `flow_control`: the server waits for an answer every so many bytes, which this sends once
    the messages before it have been handled, so a long history is read as fast as it is
    handled and no faster (without it the server may cut a reader that falls behind as a slow
    consumer). A tenant may not answer (it may publish on its own subjects only): off for
    tenants."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        stream: str,
        filter_subject: str,
        on_msg: Callable[[Msg], Awaitable[None]],
        *,
        flow_control: bool = False,
    ) -> None:
        self.nc, self.js, self.stream, self.filter = nc, js, stream, filter_subject
        self.on_msg = on_msg
        self.flow_control = flow_control
        self.sub: Subscription | None = None
        self.gen = 0  # which consumer's messages count; an older one's are ignored
        self.delivered = 0  # consumer sequence of the last message passed on
        self.last_seq = 0  # its stream sequence
        self.restart: asyncio.Task[int] | None = None

    async def start(
        self,
        policy: DeliverPolicy,
        start_seq: int | None = None,
        start_time: datetime | None = None,
    ) -> int:
        """Begin delivery; returns how many stored messages match (0: nothing to read)."""
        self.gen += 1
        gen, self.delivered = self.gen, 0

        async def on(msg: Msg) -> None:
            if gen == self.gen:
                await self._on(msg)

        inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(inbox, cb=on)  # before the consumer: nothing missed
        info = await self.js.add_consumer(
            self.stream,
            ConsumerConfig(
                name=secrets.token_hex(12),  # unguessable, so no other client can bind to it
                filter_subject=self.filter,
                deliver_subject=inbox,
                deliver_policy=policy,
                opt_start_seq=start_seq,
                opt_start_time=start_time,
                ack_policy=AckPolicy.NONE,
                mem_storage=True,
                num_replicas=1,
                flow_control=self.flow_control or None,
                idle_heartbeat=FLOW_HEARTBEAT_S if self.flow_control else None,
            ),
        )
        return info.num_pending or 0

    async def _on(self, msg: Msg) -> None:
        if not msg.data and (msg.headers or {}).get("Status") == "100":
            if msg.reply:  # a flow control request: everything before it has been handled
                await msg.respond(b"")
            return  # or an idle heartbeat
        meta = msg.metadata
        if meta.sequence.consumer != self.delivered + 1:
            self.gen += 1  # ignore the rest of this consumer; restart outside its callback
            self.restart = asyncio.create_task(self._restart(self.sub))
            return
        self.delivered, self.last_seq = meta.sequence.consumer, meta.sequence.stream
        await self.on_msg(msg)

    async def _restart(self, old: Subscription | None) -> int:
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        return await self.start(DeliverPolicy.BY_START_SEQUENCE, self.last_seq + 1)

    async def stop(self) -> None:
        if self.restart is not None:
            self.restart.cancel()
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None


async def follow(
    nc: NatsClient,
    js: JetStreamContext,
    stream: str,
    subject: str,
    on_msg: Callable[[Msg], None],
    *,
    last_per_subject: bool = False,
    since: datetime | None = None,
    flow_control: bool = False,
) -> tuple[OrderedReader, asyncio.Future[None]]:
    """Hand every message of `stream` on `subject` (all, the last per subject, or those stored
    from `since` on) to `on_msg`, then each new one. The future is done once the stored ones
    have all been handed over (at once when there are none). Stop the reader when done."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle(msg: Msg) -> None:
        on_msg(msg)
        if msg.metadata.num_pending == 0 and not done.done():
            done.set_result(None)

    reader = OrderedReader(nc, js, stream, subject, handle, flow_control=flow_control)
    policy = DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL
    if since is not None:
        policy = DeliverPolicy.BY_START_TIME
    if not await reader.start(policy, start_time=since) and not done.done():
        done.set_result(None)
    return reader, done
