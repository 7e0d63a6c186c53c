"""A pull-consumer loop with bounded concurrency: fetch only as many messages as there are slots."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

log = logging.getLogger("chainyard.consume")
STUCK_AFTER_EMPTY_FETCHES = 5
Handler = Callable[[Msg], Awaitable[None]]


class Slots:
    """A counting semaphore that also says how many slots are free right now."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = asyncio.Condition()

    async def wait_free(self) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.free > 0)
            return self.free

    def take(self) -> None:
        self.free -= 1

    async def give(self) -> None:
        self.free += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_idle(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.free == self.total)


async def consume(
    sub: JetStreamContext.PullSubscription,
    handler: Handler,
    stop: asyncio.Event,
    concurrency: int,
    *,
    name: str,
    slots: Slots | None = None,
    gate: Callable[[], Awaitable[None]] | None = None,
    fetch_timeout_s: float = 1.0,
    max_batch: int | None = None,
    rebind: Callable[[], Awaitable[JetStreamContext.PullSubscription]] | None = None,
) -> None:
    """Run `handler` on every message until `stop` is set, then finish what is in flight.

    `gate`, when given, is awaited before each fetch (a throttled worker waits there).
    `max_batch` caps one fetch (a worker with 10,000 free slots fetches in bites, not all at once).
    `rebind`, when given, makes a new pull subscription: used when fetches keep coming back
    empty while the consumer has messages waiting, which happens after a JetStream leader moves
    (nats.py #504). The subscription is closed on return.
    The handler acks, naks or terms its message; one that raises gets its message nak'ed with a
    growing delay (it comes back) and the loop goes on: one bad message never stops it.
    """
    slots = slots or Slots(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def run(msg: Msg) -> None:
        try:
            await handler(msg)
        except Exception:
            # It comes back, later each time (0.25 s doubling to 30 s): a stream that is full
            # or a leader election must not turn into a hot loop, nor into a dropped message.
            n = msg.metadata.num_delivered or 1
            log.exception(
                "%s: handler failed on %s (delivery %d); will retry", name, msg.subject, n
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=min(0.25 * 2 ** (n - 1), 30.0))
        finally:
            await slots.give()

    idle = 0  # empty fetches in a row
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            if gate is not None:
                await gate()
            free = await slots.wait_free()
            if stop.is_set():
                break
            try:
                batch = free if max_batch is None else min(free, max_batch)
                fetch = asyncio.ensure_future(sub.fetch(batch=batch, timeout=fetch_timeout_s))
                done, _ = await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if fetch not in done:
                    fetch.cancel()
                    with contextlib.suppress(BaseException):
                        await fetch
                    break
                msgs = fetch.result()
            except (TimeoutError, NatsTimeoutError):
                idle += 1
                if rebind is not None and idle >= STUCK_AFTER_EMPTY_FETCHES:
                    idle = 0
                    sub = await _rebind_if_stuck(sub, rebind, name)
                continue
            except ConnectionClosedError:
                break
            except Exception as e:  # server restart, leader change: back off and fetch again
                log.warning("%s: fetch failed: %s", name, e)
                await asyncio.sleep(0.2)
                idle += 1  # a subscription that keeps failing is rebound like a stuck one
                continue
            idle = 0
            for msg in msgs:
                slots.take()
                t = asyncio.create_task(run(msg))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
    finally:
        stopping.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # Unsubscribe rather than leave it to drain: a cancelled fetch can leave the server's
        # 408 status reply queued, and a drain would wait on it until it times out.
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _rebind_if_stuck(
    sub: JetStreamContext.PullSubscription,
    rebind: Callable[[], Awaitable[JetStreamContext.PullSubscription]],
    name: str,
) -> JetStreamContext.PullSubscription:
    """Nothing arrived for a while: if the consumer has messages waiting, the subscription is
    stale (a leader moved under it), so bind a new one. One cheap info request per idle spell."""
    try:
        info = await sub.consumer_info()
    except Exception as e:
        log.warning("%s: consumer info failed while idle: %s", name, e)
        return sub
    if info.num_pending == 0:
        return sub
    log.warning("%s: %d messages waiting but none delivered: rebinding", name, info.num_pending)
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    try:
        return await rebind()
    except Exception as e:
        log.warning("%s: rebinding failed, will try again: %s", name, e)
        return sub
