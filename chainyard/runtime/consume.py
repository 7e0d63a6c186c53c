"""A pull-consumer loop with bounded concurrency: fetch only as many messages as there are slots.

One `fetch` at a time, sized to the free slots (up to `max_batch`). nats-py's fetch returns as
soon as the first message has come and the server has sent what it had ready, so a fetch
waiting on an idle consumer hands over a new message at once; while a backlog lasts, each fetch
takes the slots freed during the previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext

log = logging.getLogger("chainyard.consume")
STUCK_AFTER_EMPTY_FETCHES = 5  # expiry periods with nothing delivered before a staleness check
# On stop, a fetch under way this long is let finish (its messages are nak'ed for another
# consumer); one still waiting then is cancelled: nothing had come for it.
STOP_GRACE_S = 0.1
Handler = Callable[[Msg], Awaitable[None]]
PullSub = JetStreamContext.PullSubscription


def release_slot() -> None:
    """From a handler run by `consume`: give its slot back now, before it returns. For work left
    that the slots do not bound: a worker's slots bound provider calls, so once the call has
    answered, recording the result (a publish and an ack, a round trip each) lets the next
    message start. The consume loop still awaits the handler on stop. Elsewhere: a no-op."""
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
        self.total = total
        self.free = total

    def take(self) -> None:
        self.free -= 1

    def give(self) -> None:
        self.free += 1


async def consume(
    sub: PullSub,
    handler: Handler,
    stop: asyncio.Event,
    concurrency: int,
    *,
    name: str,
    slots: Slots | None = None,
    gate: Callable[[], Awaitable[None] | None] | None = None,
    fetch_timeout_s: float = 1.0,
    max_batch: int | None = None,
    rebind: Callable[[], Awaitable[PullSub]] | None = None,
) -> None:
    """Run `handler` on every message of the pull subscription `sub` until `stop` is set, then
    finish what is in flight.

    At most `concurrency` handlers run at once (`slots` shares the count with the caller, e.g.
    for heartbeats). `gate`, when given, is called before each fetch: None lets it go, an
    awaitable holds it until done (a throttled worker waits there). `max_batch` caps one fetch
    (a worker with 10,000 free slots asks in bites, so the other workers of its pool get their
    share). A fetch waits at most `fetch_timeout_s` for a first message.
    `rebind`, when given, makes a new pull subscription: used when nothing is delivered for a
    while although the consumer has messages waiting, which happens after a server restart or a
    JetStream leader move (nats.py #504). The subscription is unsubscribed on return, not drained
    (DESIGN-NOTES #7).
    The handler acks, naks or terms its message; one that raises gets its message nak'ed with a
    growing delay (it comes back) and the loop goes on: one bad message never stops it.
    """
    slots = slots or Slots(concurrency)
    c = _Consumer(sub, handler, stop, slots, name, gate, fetch_timeout_s, max_batch, rebind)
    await c.run()


class _Consumer:
    def __init__(
        self,
        sub: PullSub,
        handler: Handler,
        stop: asyncio.Event,
        slots: Slots,
        name: str,
        gate: Callable[[], Awaitable[None] | None] | None,
        expires_s: float,
        max_batch: int | None,
        rebind: Callable[[], Awaitable[PullSub]] | None,
    ) -> None:
        self.sub = sub
        self.handler = handler
        self.stop = stop
        self.slots = slots
        self.name = name
        self.gate = gate
        self.expires_s = expires_s
        self.max_batch = max(1, min(max_batch or slots.total, slots.total))
        self.rebind = rebind
        self.tasks: set[asyncio.Task[None]] = set()
        self.released: set[asyncio.Task[Any] | None] = set()  # running, slot given back early
        self.freed = asyncio.Event()  # a slot was given back (or stop was set)
        self.last_delivery = self.last_check = time.monotonic()

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.ensure_future(self.stop.wait())
        self.stopped.add_done_callback(lambda _: self.freed.set())
        fetching: asyncio.Future[list[Msg]] | None = None
        try:
            while not self.stop.is_set():
                if self.slots.free <= 0:
                    self.freed.clear()
                    await self.freed.wait()
                    continue
                held = self.gate() if self.gate is not None else None
                if held is not None and not await self._gate(held):
                    break
                n = min(self.slots.free, self.max_batch)
                fetching = asyncio.ensure_future(self.sub.fetch(n, timeout=self.expires_s))
                await asyncio.wait((fetching, self.stopped), return_when=asyncio.FIRST_COMPLETED)
                if not fetching.done():
                    break  # stopped while waiting: the finally ends the fetch
                got, fetching = fetching, None
                if not await self._took(got):
                    break
        finally:
            self.stopped.cancel()
            if fetching is not None:
                await self._end_fetch(fetching)
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            while self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _took(self, fetched: asyncio.Future[list[Msg]]) -> bool:
        """Start a handler per fetched message; False when the connection is closed."""
        try:
            msgs = fetched.result()
        except TimeoutError:  # nothing came within expires (nats-py's is also the builtin one)
            await self._check_stuck()
            return True
        except ConnectionClosedError:
            return False
        except Exception as e:  # 503 no consumer, disconnected with a full buffer...: not hot
            log.warning("%s: fetch failed: %s", self.name, e)
            await asyncio.wait((self.stopped,), timeout=0.2)
            await self._check_stuck()
            return True
        self.last_delivery = time.monotonic()
        for msg in msgs:
            if self.stop.is_set():
                self._nak_now(msg)
            else:
                self._start(msg)
        return True

    async def _end_fetch(self, fetching: asyncio.Future[list[Msg]]) -> None:
        """On stop: a fetch that is being served finishes and its messages go back at once; one
        still waiting is cancelled (unsubscribing withdraws its pull request)."""
        await asyncio.wait((fetching,), timeout=STOP_GRACE_S)
        if not fetching.done():
            fetching.cancel()
            await asyncio.wait((fetching,))
        if not fetching.cancelled() and fetching.exception() is None:
            for msg in fetching.result():
                self._nak_now(msg)

    # -- handlers ---------------------------------------------------------------------------

    def _start(self, msg: Msg) -> None:
        self.slots.take()
        t = self.loop.create_task(self._run(msg))
        self.tasks.add(t)
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self.tasks.discard(t)
        if self.released and t in self.released:
            self.released.discard(t)
        else:
            self._give()

    def release(self, t: asyncio.Task[Any] | None) -> None:
        if t in self.tasks and t not in self.released:
            self.released.add(t)
            self._give()

    def _give(self) -> None:
        self.slots.give()
        self.freed.set()

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

    def _nak_now(self, msg: Msg) -> None:
        t = self.loop.create_task(msg.nak())
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # -- waiting ----------------------------------------------------------------------------

    async def _gate(self, held: Awaitable[None]) -> bool:
        """Wait for the gate; False when stopped meanwhile."""
        g = asyncio.ensure_future(held)
        try:
            await asyncio.wait({g, self.stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not g.done():
                g.cancel()
        return not self.stop.is_set()

    async def _check_stuck(self) -> None:
        """Nothing arrived for a while: if the consumer has messages waiting, the subscription is
        stale (the server restarted, a leader moved under it), so bind a new one. One info
        request per idle spell."""
        now = time.monotonic()
        idle = STUCK_AFTER_EMPTY_FETCHES * self.expires_s
        if self.rebind is None or now - self.last_delivery < idle or now - self.last_check < idle:
            return
        self.last_check = now
        try:
            info = await self.sub.consumer_info()
        except Exception as e:
            log.warning("%s: consumer info failed while idle: %s", self.name, e)
            info = None
        if info is not None and info.num_pending == 0:
            return
        waiting = info.num_pending if info is not None else "?"
        log.warning("%s: %s messages waiting but none delivered: rebinding", self.name, waiting)
        try:
            sub = await self.rebind()
        except Exception as e:
            log.warning("%s: rebinding failed, will try again: %s", self.name, e)
            return
        old, self.sub = self.sub, sub
        with contextlib.suppress(Exception):
            await old.unsubscribe()
