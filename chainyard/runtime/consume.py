"""A pull-consumer loop with bounded concurrency: messages are asked for only as slots free up.

One pull request (JetStream's `$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>`, as nats-py's
`fetch` sends it) is kept waiting at the server for as many messages as there are free slots;
deliveries and the request's end arrive in the callback of a subscription on the loop's own
inbox, so there is no task or round trip per message. docs/DESIGN-NOTES.md #27 has the why,
what the loop tracks and the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError
from nats.js.api import DEFAULT_PREFIX, Header, StatusCode

log = logging.getLogger("chainyard.consume")
# On stop, messages delivered before the server saw the inbox go are nak'ed within this long
STOP_GRACE_S = 2.0
# A pull request with no end (408) by its expiry plus this long is taken as lost
LOST_AFTER_S = 0.5
# After a request the server refused (409: too many waiting, a batch over the consumer's max...)
# the next waits this long: asking again at once would repeat the refusal in a hot loop
REFUSED_PAUSE_S = 0.2
Handler = Callable[[Msg], Awaitable[None]]


@dataclass(frozen=True)
class Durable:
    """A durable pull consumer to take messages from: the connection, stream and its name."""

    nc: Client
    stream: str
    name: str

    @property
    def next_subject(self) -> str:
        return f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{self.name}"


def release_slot() -> None:
    """From a handler run by `consume`: give its slot back now, before it returns (a worker's
    slots bound provider calls, not the recording after; docs/DESIGN-NOTES.md #18). The loop
    still awaits the handler on stop. Elsewhere: a no-op."""
    c = _running.get()
    if c is not None:
        c.release(asyncio.current_task())


_running: contextvars.ContextVar[_Consumer | None] = contextvars.ContextVar(
    "chainyard_consumer", default=None
)


class Slots:
    """How many of `total` slots are free right now. Taking and giving is counting: the consume
    loop is the only one that waits for slots, and it is told by its own tasks' done callbacks."""

    def __init__(self, total: int) -> None:
        self.total = self.free = total


async def consume(
    durable: Durable,
    handler: Handler,
    stop: asyncio.Event,
    concurrency: int,
    *,
    name: str,
    slots: Slots | None = None,
    gate: Callable[[], Awaitable[None] | None] | None = None,
    request_expires_s: float = 1.0,
    max_batch: int | None = None,
    rebind: Callable[[], Awaitable[Durable]] | None = None,
) -> None:
    """Run `handler` on every message of the durable pull consumer until `stop` is set, then
    finish what is in flight. The handler acks, naks or terms its message; one that raises gets
    it nak'ed with a growing delay, and the loop goes on.

    At most `concurrency` handlers run at once (`slots` shares the count with the caller).
    `gate()` before each pull request: None lets it go, an awaitable holds it (a throttled
    worker waits with no request left at the server). `max_batch` caps one request, so a worker
    with 10,000 free slots leaves its pool's other workers a share. A request waits at most
    `request_expires_s` at the server. `rebind()` makes the consumer exist again (it may name
    another) when the server says it does not.
    """
    slots = slots or Slots(concurrency)
    max_batch = max(1, min(max_batch or slots.total, slots.total))
    await _Consumer(
        durable, handler, stop, slots, name, gate, request_expires_s, max_batch, rebind
    ).run()


@dataclass(eq=False)
class _Consumer:
    durable: Durable
    handler: Handler
    stop: asyncio.Event
    slots: Slots
    name: str
    gate: Callable[[], Awaitable[None] | None] | None
    expires_s: float
    max_batch: int
    rebind: Callable[[], Awaitable[Durable]] | None

    def __post_init__(self) -> None:
        self.tasks: dict[asyncio.Task[Any] | None, bool] = {}  # running: slot given back early?
        self.wake = asyncio.Event()  # a request is due (or stop was set)
        self.stopping = False
        self.inbox = self.durable.nc.new_inbox()
        self.sub: Subscription | None = None
        self.ids = itertools.count()
        # the pull request waiting at the server: its reply subject, what it still may bring,
        # and when it is judged lost
        self.reply = ""
        self.left = 0
        self.lost_at = 0.0
        self.missing = False  # the server said the consumer does not exist
        self.refused = False  # the server refused the last request

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.ensure_future(self.stop.wait())
        self.stopped.add_done_callback(lambda _: self.wake.set())
        try:
            self.sub = await self.durable.nc.subscribe(self.inbox + ".*", cb=self._on_msg)
            while not self.stop.is_set():
                self.wake.clear()
                if self.missing:
                    await self._rebind()
                elif self.refused:
                    self.refused = False
                    await asyncio.wait((self.stopped,), timeout=REFUSED_PAUSE_S)
                    continue
                held = self.gate() if self.gate is not None else None
                if held is not None and not await self._gate(held):
                    break
                if self.reply and time.monotonic() > self.lost_at:
                    log.info("%s: pull request %s lost, asking again", self.name, self.reply)
                    self.reply = ""
                if not self.reply and self.slots.free > 0 and not await self._request():
                    break
                await self._sleep()
        except ConnectionClosedError:
            pass
        finally:
            self.stopped.cancel()
            self.stopping = True
            await self._close()
            while self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _request(self) -> bool:
        """Ask for as many messages as there are free slots; False when the connection closed."""
        n = min(self.slots.free, self.max_batch)
        reply = f"{self.inbox}.{next(self.ids)}"
        req = {"batch": n, "expires": int(self.expires_s * 1e9)}
        try:
            await self.durable.nc.publish(
                self.durable.next_subject, json.dumps(req).encode(), reply=reply
            )
        except ConnectionClosedError:
            return False
        except Exception as e:  # disconnected with a full buffer...: not hot
            log.warning("%s: pull request failed: %s", self.name, e)
            await asyncio.wait((self.stopped,), timeout=0.2)
            return True
        self.reply, self.left = reply, n
        self.lost_at = time.monotonic() + self.expires_s + LOST_AFTER_S
        return True

    async def _sleep(self) -> None:
        """Until a request is due, or a waiting one's time is up."""
        if self.reply:
            timeout = max(0.0, self.lost_at - time.monotonic())
        else:  # no request: waiting for a slot, or a failed request to be sent again
            timeout = None if self.slots.free <= 0 else 0.0
        if timeout == 0.0 or self.wake.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)

    async def _on_msg(self, msg: Msg) -> None:
        """The inbox's callback: a message to handle, or the end of a pull request."""
        headers = msg.headers
        status = headers.get(Header.STATUS) if headers else None
        if not status:
            if self.stopping:  # for another consumer, at once
                with contextlib.suppress(Exception):
                    await msg.nak()
                return
            self._start(msg)
            if self.reply:  # a delivery carries its stream subject: it is the waiting request's
                self.left -= 1
                if self.left <= 0:  # served: the next request may go
                    self.reply = ""
                    self.wake.set()
            return
        if status == StatusCode.CONTROL_MESSAGE or msg.subject != self.reply:
            return  # a heartbeat, or the end of a request already given up
        self.reply = ""
        self.wake.set()
        if status == StatusCode.REQUEST_TIMEOUT:  # expired: the usual end while idle
            return
        what = headers.get(Header.DESCRIPTION, "") if headers else ""
        if status == StatusCode.SERVICE_UNAVAILABLE or "deleted" in what.lower():
            self.missing = True
        else:
            self.refused = True
        log.warning("%s: pull request ended: %s %s", self.name, status, what)

    async def _rebind(self) -> None:
        """The consumer is gone: `rebind` makes it again; without one, ask again after a pause."""
        self.missing = False
        try:
            if self.rebind is not None:
                self.durable = await self.rebind()
                return
        except Exception as e:
            log.warning("%s: rebinding failed, will try again: %s", self.name, e)
            self.missing = True
        await asyncio.wait((self.stopped,), timeout=0.2)

    async def _withdraw(self) -> None:
        """Take back the waiting pull request: the server drops a request whose inbox has no
        subscriber. What it had sent already is handled; the next request uses a new inbox."""
        await self._close()
        self.reply = ""
        self.inbox = self.durable.nc.new_inbox()
        self.sub = await self.durable.nc.subscribe(self.inbox + ".*", cb=self._on_msg)

    async def _close(self) -> None:
        """Unsubscribe the inbox; messages the server sent before it saw that are still
        handled by `_on_msg` (nak'ed at once when stopping)."""
        sub, self.sub = self.sub, None
        if sub is None:
            return
        try:
            await asyncio.wait_for(sub.drain(), STOP_GRACE_S)
        except Exception:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- handlers ---------------------------------------------------------------------------

    def _start(self, msg: Msg) -> None:
        self.slots.free -= 1
        t = self.loop.create_task(self._run(msg))
        self.tasks[t] = False
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        if not self.tasks.pop(t):
            self._give()

    def release(self, t: asyncio.Task[Any] | None) -> None:
        if self.tasks.get(t) is False:
            self.tasks[t] = True
            self._give()

    def _give(self) -> None:
        self.slots.free += 1
        if not self.reply:  # a request is due only when none is waiting
            self.wake.set()

    async def _run(self, msg: Msg) -> None:
        _running.set(self)  # this task's own context: for release_slot()
        try:
            await self.handler(msg)
        except Exception:
            # It comes back, later each time (0.25 s doubling to 30 s): a stream that is full
            # or a leader election must not turn into a hot loop, nor into a dropped message.
            n = msg.metadata.num_delivered or 1
            log.exception(
                "%s: handler failed on %s (delivery %d); will retry", self.name, msg.subject, n
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(0.25 * 2 ** (n - 1), 30.0))

    # -- waiting ----------------------------------------------------------------------------

    async def _gate(self, held: Awaitable[None]) -> bool:
        """Wait for the gate, with no request waiting at the server; False when stopped."""
        if self.reply:
            await self._withdraw()
        g = asyncio.ensure_future(held)
        try:
            await asyncio.wait({g, self.stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not g.done():
                g.cancel()
        return not self.stop.is_set()
