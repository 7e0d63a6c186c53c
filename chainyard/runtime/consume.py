"""A pull-consumer loop with bounded concurrency: ask for only as many messages as there are slots.

Pull requests stay outstanding (lean.Puller): when a handler finishes and enough slots are free
that are not already asked for, one request asks for them, so a slot never waits a round trip
for its next message, and messages go straight from the subscription callback to a handler task.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext

from .lean import Puller, num_delivered

log = logging.getLogger("chainyard.consume")
STUCK_AFTER_EMPTY_FETCHES = 5  # expiry periods with nothing delivered before a staleness check
# Messages asked for and not yet delivered, in pull requests of `max_batch`: at most this many
# requests' worth. A pull request waits at the server until it is served or expires, and a
# consumer holds at most 512 waiting (its max_waiting): 40 from each idle 10,000-slot worker
# filled that with 13 workers. A request is answered in one round trip while work is queued,
# so four keep even 10,000 slots fed.
ASKED_REQUESTS = 4
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
    """Run `handler` on every message until `stop` is set, then finish what is in flight.

    `sub` names the stream and durable consumer (a pull subscription from `Bus.pull`); its own
    fetch subscription is not used. At most `concurrency` handlers run at once (`slots` shares
    the count with the caller, e.g. for heartbeats).
    `gate`, when given, is called before each pull request: None lets the request go, an
    awaitable holds it until done (a throttled worker waits there).
    `max_batch` caps one pull request (a worker with 10,000 free slots asks in bites, so the
    other workers of its pool get their share). A pull request expires after `fetch_timeout_s`.
    `rebind`, when given, makes a new pull subscription: used when nothing is delivered for a
    while although the consumer has messages waiting, which happens after a JetStream leader
    moves (nats.py #504). The subscription is closed on return.
    The handler acks, naks or terms its message; one that raises gets its message nak'ed with a
    growing delay (it comes back) and the loop goes on: one bad message never stops it.
    On `stop`, messages that arrive after it (from requests still outstanding) are nak'ed at once
    for another consumer to take, and the handlers running are awaited.
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
        self.nc: Any = sub._nc
        self.js: JetStreamContext = sub._js
        self.handler = handler
        self.stop = stop
        self.slots = slots
        self.name = name
        self.gate = gate
        self.expires_s = expires_s
        self.max_batch = max(1, min(max_batch or slots.total, slots.total))
        # Ask again once this many free slots are not asked for: a few requests per batch.
        self.threshold = max(1, self.max_batch // 8)
        self.max_asked = ASKED_REQUESTS * self.max_batch
        self.rebind = rebind
        self.tasks: set[asyncio.Task[None]] = set()
        self.released: set[asyncio.Task[Any] | None] = set()  # running, slot given back early
        self.waiting: deque[Msg] = deque()  # delivered beyond the free slots: run when one frees
        self.stopping = False
        self.wake = asyncio.Event()
        self.backoff_until = 0.0
        self.last_delivery = self.last_pull = self.last_check = time.monotonic()
        self.reconnects = self.nc.stats.get("reconnects", 0)
        self.puller = self._puller(sub)

    def _puller(self, sub: PullSub) -> Puller:
        return Puller(
            self.nc, sub._stream, sub._consumer, self._deliver, self._on_status,
            expires_s=self.expires_s,
        )  # fmt: skip

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        waker = asyncio.ensure_future(self.stop.wait())
        waker.add_done_callback(lambda _: self.wake.set())
        try:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()  # its fetch subscription: we pull on our own
            await self.puller.start()
            await self._pull_loop()
        finally:
            self.stopping = True
            waker.cancel()
            await self.puller.stop(self._nak_now)
            while self.waiting:
                self._nak_now(self.waiting.popleft())
            while self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    # -- delivery: from the subscription callback, no awaits ------------------------------

    def _deliver(self, msg: Msg) -> None:
        self.last_delivery = self.puller.last_heard
        if self.stopping or self.stop.is_set():
            self._nak_now(msg)
        elif self.slots.free > 0 and not self.waiting:
            self._start(msg)
            # A request served in full leaves slots that nobody has asked for yet: ask now,
            # not when a handler finishes (a worker with 10,000 free slots and a backlog would
            # otherwise start only max_asked messages per handler duration).
            if self.puller.pending < self.max_asked - self.threshold and (
                self._want() >= self.threshold
            ):
                self.wake.set()
        else:  # more came than asked for (requests outlived a reset): run it when a slot frees
            self.waiting.append(msg)

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
        if self.waiting and not self.stopping:
            self._start(self.waiting.popleft())
        if self._want() >= self.threshold:  # (also when a waiting message took the slot)
            self.wake.set()

    async def _run(self, msg: Msg) -> None:
        _running.set(self)  # this task's own context: for release_slot()
        try:
            await self.handler(msg)
        except Exception:
            # It comes back, later each time (0.25 s doubling to 30 s): a stream that is full
            # or a leader election must not turn into a hot loop, nor into a dropped message.
            n = num_delivered(msg)
            log.exception(
                "%s: handler failed on %s (delivery %d); will retry", self.name, msg.subject, n
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(0.25 * 2 ** (n - 1), 30.0))

    def _nak_now(self, msg: Msg) -> None:
        t = self.loop.create_task(msg.nak())
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _on_status(self, status: str, description: str) -> None:
        if status in ("404", "408"):
            pass  # a request expired: ask again if slots are free
        elif status == "409" and "Leadership Change" in description:
            log.info("%s: consumer leader changed: asking again", self.name)
        else:  # 503 (no consumer), 409 consumer deleted / max waiting, 400...: not in a hot loop
            log.warning("%s: pull request ended with %s %s", self.name, status, description)
            self.backoff_until = time.monotonic() + 0.2
        self.wake.set()

    # -- asking for messages --------------------------------------------------------------

    def _want(self) -> int:
        return min(self.slots.free - len(self.waiting), self.max_asked) - self.puller.pending

    async def _pull_loop(self) -> None:
        next_tick = time.monotonic() + self.expires_s
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.expires_s
                if self.nc.is_closed:
                    return
                await self._housekeeping(now)
                continue
            want = self._want()
            if now >= self.backoff_until and (
                want >= self.threshold or (want > 0 and self.puller.pending == 0)
            ):
                held = self.gate() if self.gate is not None else None
                if held is not None and not await self._gate(held):
                    return
                want = self._want()
                if want <= 0:
                    continue
                try:
                    await self.puller.pull(min(want, self.max_batch))
                    self.last_pull = time.monotonic()
                except ConnectionClosedError:
                    return
                except Exception as e:  # disconnected with a full buffer, ...: again shortly
                    log.warning("%s: pull request failed: %s", self.name, e)
                    self.backoff_until = time.monotonic() + 0.2
                continue
            self.wake.clear()
            wake_at = min(next_tick, self.backoff_until) if self.backoff_until > now else next_tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.001, wake_at - now))

    async def _gate(self, held: Awaitable[None]) -> bool:
        """Wait for the gate; False when stopped meanwhile."""
        g = asyncio.ensure_future(held)
        s = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({g, s}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            s.cancel()
            if not g.done():
                g.cancel()
        return not self.stop.is_set()

    async def _housekeeping(self, now: float) -> None:
        p = self.puller
        reconnects = self.nc.stats.get("reconnects", 0)
        if reconnects != self.reconnects:  # requests made before may be gone with the server
            self.reconnects = reconnects
            p.reset()
        elif p.pending and now - p.last_heard > 2 * self.expires_s + 1.0:
            p.reset()  # neither a message nor an expiry came back: those requests are lost
        idle = STUCK_AFTER_EMPTY_FETCHES * self.expires_s
        asking = now - self.last_pull < 2 * self.expires_s
        if (
            self.rebind is not None
            and asking
            and now - self.last_delivery >= idle
            and now - self.last_check >= idle
        ):
            self.last_check = now
            await self._rebind_if_stuck()

    async def _rebind_if_stuck(self) -> None:
        """Nothing arrived for a while: if the consumer has messages waiting, the subscription is
        stale (a leader moved under it), so bind a new one. One info request per idle spell."""
        assert self.rebind is not None
        p = self.puller
        try:
            info = await self.js.consumer_info(p.stream, p.durable)
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
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        old, self.puller = p, self._puller(sub)
        await self.puller.start()
        await old.stop(self._deliver)
