"""Lean JetStream publishing and pulling: what nats-py does per message, for a fraction of the CPU.

`Publisher.publish(subject, payload, headers=...)` has `js.publish`'s shape and errors: one
wildcard reply subscription with a callback, a counter token per request, a future per request
in a dict, the timeouts by one `loop.call_at` timer over a heap of deadlines (no `wait_for`),
the PubAck decoded with msgspec, the header block written by `lean_wire` (nats-py's bytes).
Errors are nats-py's: `nats.js.errors.APIError` and its subclasses for an error reply (wrong
expected sequence, ...), `NoResponders` (both `NoStreamResponseError` and `NoRespondersError`)
when no stream takes the subject, `nats.errors.TimeoutError` when nothing comes back in time
(also what a request lost in a reconnect ends as: its future times out, it never hangs).
Unlike `js.publish`, a 503 (no responders: the stream has no leader, e.g. during an election)
is sent again until the timeout is spent, as nats.go does: nothing was stored, so it is safe.

`Puller` keeps pull requests outstanding on one callback subscription (see consume.py, which
drives it): `{"batch": n, "expires": ns}` to `$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`,
with the replies' status messages (408 expired, 409 leader change / consumer deleted, 503 no
consumer, 100 heartbeat) turned into accounting of what is still owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from heapq import heappop, heappush
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from .lean_wire import lean_headers, publish_with_headers

log = logging.getLogger("chainyard.lean")
STATUS = "Status"
# A 503 (no stream leader) is asked again after this pause, doubling up to the max, until the
# request's timeout is spent.
NO_RESPONDERS_PAUSE_S = 0.05
NO_RESPONDERS_MAX_PAUSE_S = 0.5
PENDING_MSGS = "Nats-Pending-Messages"


class NoResponders(NoStreamResponseError, NoRespondersError):
    """No stream took the subject (a 503 status reply): what `js.publish` raises, and what a
    caller catching core NATS' `NoRespondersError` expects."""


class _ApiErr(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class _Reply(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool | None = None
    domain: str | None = None
    error: _ApiErr | None = None


_reply = msgspec.json.Decoder(_Reply)


class _Direct:
    """Stands in for a nats-py subscription's message queue: the read loop's `put_nowait` calls
    the handler at once, so a message costs no queue, no task switch and no coroutine. The
    subscription's own task waits on `get` forever (cancelled on unsubscribe)."""

    def __init__(self, sub: Any, handler: Callable[[Msg], None]) -> None:
        self.sub = sub
        self.handler = handler

    def put_nowait(self, msg: Msg) -> None:
        self.sub._pending_size -= len(msg.data)
        try:
            self.handler(msg)
        except Exception:  # never into nats-py's read loop: that would end the connection
            log.exception("handler failed on a message on %s", msg.subject)

    async def get(self) -> Msg:
        return await asyncio.get_running_loop().create_future()  # never done

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


async def _ignore(msg: Msg) -> None:
    pass


async def subscribe_direct(nc: Client, subject: str, handler: Callable[[Msg], None]) -> Any:
    """A core subscription whose messages go straight from nats-py's read loop to `handler`
    (synchronous: it must not block). Survives reconnects like any subscription. The
    connection's received headers are parsed by `parse_header_lines` from then on."""
    lean_headers(nc)
    sub = await nc.subscribe(subject, cb=_ignore)
    sub._pending_queue = _Direct(sub, handler)  # before any message: no await since SUB
    return sub


class Publisher:
    """`js.publish` for the hot path. Safe to share across tasks; start() is lazy."""

    def __init__(self, nc: Client, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._cut = 0
        self._n = 0
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        # Deadlines in a heap, one timer at the earliest: a timer per request (call_later and
        # cancel) costs more than the rest of a publish. Entries of answered requests stay in
        # the heap until their deadline passes (at most rate x timeout of them).
        self._deadlines: list[tuple[float, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._starting: asyncio.Future[None] | None = None
        self._sub: Any = None

    async def _start(self) -> None:
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            try:
                prefix = f"{self.nc._inbox_prefix.decode()}.{self.nc._nuid.next().decode()}."
                self._sub = await subscribe_direct(self.nc, prefix + "*", self._on_reply)
                self._prefix, self._cut = prefix, len(prefix)
                self._starting.set_result(None)
            except BaseException as e:
                self._starting.set_exception(e)
                self._starting.exception()  # retrieved: the caller gets it below
                self._starting = None
                raise
        else:
            await asyncio.shield(self._starting)

    def _on_reply(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject[self._cut :], None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now, heap, waiting = loop.time(), self._deadlines, self._waiting
        while heap and heap[0][0] <= now:
            fut = waiting.pop(heappop(heap)[1], None)
            if fut is not None and not fut.done():
                fut.set_exception(NatsTimeoutError())
        if heap:
            self._arm(loop, heap[0][0])

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        if not self._prefix:
            await self._start()
        if stream is not None:
            headers = {**(headers or {}), "Nats-Expected-Stream": stream}
        loop = asyncio.get_running_loop()
        at = loop.time() + (self.timeout if timeout is None else timeout)
        pause = NO_RESPONDERS_PAUSE_S
        while True:
            self._n += 1
            token = str(self._n)
            fut: asyncio.Future[Msg] = loop.create_future()
            self._waiting[token] = fut
            heappush(self._deadlines, (at, token))
            if self._timer is None or at < self._timer_at:
                self._arm(loop, at)
            try:
                if headers:
                    await publish_with_headers(
                        self.nc, subject, self._prefix + token, payload, headers
                    )
                else:
                    await self.nc.publish(subject, payload, reply=self._prefix + token)
                msg = await fut
            finally:
                self._waiting.pop(token, None)
            data = msg.data
            if data:
                break
            hdrs = msg.headers
            if not (hdrs and hdrs.get(STATUS) == "503"):
                raise APIError(description=f"empty reply to a publish on {subject}")
            # No stream took it, so nothing was stored: while the stream elects a leader (a
            # node was lost) there is none for seconds. Sending again is safe, with or without
            # a message id; giving up at once made a caller's retry (a nak) burn one of the
            # message's deliveries per attempt, and a work message ran out of them mid-election.
            if loop.time() + pause >= at:
                raise NoResponders
            await asyncio.sleep(pause)
            pause = min(pause * 2, NO_RESPONDERS_MAX_PAUSE_S)
        r = _reply.decode(data)
        if r.error is not None:
            e = r.error
            APIError.from_error(
                {"code": e.code, "err_code": e.err_code, "description": e.description}
            )
        return PubAck(stream=r.stream, seq=r.seq, domain=r.domain, duplicate=r.duplicate)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        self._prefix, self._starting = "", None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(NatsTimeoutError())
        self._waiting.clear()


def num_delivered(msg: Msg) -> int:
    """How many times JetStream delivered this message, from its ack subject, without building
    nats-py's Metadata (a datetime and two dataclasses per message)."""
    tokens = msg.reply.split(".")
    n = len(tokens)
    if n == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
        return int(tokens[4])
    if n >= 11:  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>....
        return int(tokens[6])
    return 1


class Puller:
    """Pull requests kept outstanding for up to `want()` messages, on one callback subscription.

    `pending` counts the messages asked for and not yet delivered nor given up by the server
    (a 408 / 409 says how many of its batch it drops in `Nats-Pending-Messages`). Delivered
    messages go to `deliver`; status messages only update the accounting, and `on_status` is told
    (the driver decides whether to ask again, back off, or rebind).
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        durable: str,
        deliver: Callable[[Msg], None],
        on_status: Callable[[str, str], None],
        *,
        expires_s: float = 1.0,
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.durable = durable
        self.deliver = deliver
        self.on_status = on_status
        self.expires_ns = int(expires_s * 1e9)
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = ""
        self.pending = 0  # asked for, not delivered, not given up
        self.last_heard = time.monotonic()  # any message or status
        self._sub: Any = None

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self._sub = await subscribe_direct(self.nc, self.inbox, self._on_msg)

    async def pull(self, batch: int) -> None:
        """Ask for `batch` more: they come within `expires`, or a 408 says how many won't."""
        body = b'{"batch":%d,"expires":%d}' % (batch, self.expires_ns)
        self.pending += batch
        try:
            await self.nc.publish(self.next_subject, body, reply=self.inbox)
        except BaseException:
            self.pending -= batch
            raise

    def reset(self) -> None:
        """Forget what was asked for (requests lost in a reconnect or a leader change)."""
        self.pending = 0

    def _on_msg(self, msg: Msg) -> None:
        self.last_heard = time.monotonic()
        if msg.reply:  # a JetStream message: $JS.ACK...
            if self.pending > 0:
                self.pending -= 1
            self.deliver(msg)
            return
        hdrs = msg.headers or {}
        status = hdrs.get(STATUS, "")
        if status == "100":  # idle heartbeat
            return
        owed = hdrs.get(PENDING_MSGS)
        if owed is not None and owed.isdigit():
            self.pending = max(0, self.pending - int(owed))
        elif status != "404":
            self.pending = 0  # cannot tell which request ended: ask afresh
        self.on_status(status, hdrs.get("Description", "").split("\n", 1)[0].strip())

    async def stop(self, straggler: Callable[[Msg], None]) -> None:
        """Withdraw interest: UNSUB, then a round trip during which messages the server had
        already sent still arrive (to `straggler`), then drop the subscription."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        self.deliver = straggler
        with contextlib.suppress(Exception):
            await self.nc._send_unsubscribe(sub._id)
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
