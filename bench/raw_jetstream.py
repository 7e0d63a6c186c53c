"""The baseline: a hand-written JetStream worker loop with nothing of chainyard in it.

work stream (work queue) -> durable pull consumer, fetch batched to free slots -> publish the
result to a second stream and wait for its PubAck -> ack the work. The same delivery discipline
as chainyard's worker (result durable before the ack, Nats-Msg-Id on both publishes), none of
the routing, state or validation.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from .drive import Completions

WORK_STREAM = "BENCH_RAW_WORK"
RESULT_STREAM = "BENCH_RAW_RESULTS"
WORK_SUBJECT = "bench.raw.work"
RESULT_PREFIX = "bench.raw.result."
DURABLE = "bench-raw-worker"


@dataclass
class RawLoop:
    """Streams, one worker task and a result subscription on one connection."""

    nc: Client
    js: JetStreamContext
    completions: Completions
    slots: int
    payload: bytes
    result: bytes
    _stop: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None
    _sub: Subscription | None = None
    _pull: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        await self.js.add_stream(
            StreamConfig(
                name=WORK_STREAM,
                subjects=[WORK_SUBJECT],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
        await self.js.add_stream(
            StreamConfig(
                name=RESULT_STREAM,
                subjects=[RESULT_PREFIX + "*"],
                storage=StorageType.FILE,
            )
        )
        await self.js.add_consumer(
            WORK_STREAM,
            ConsumerConfig(
                durable_name=DURABLE,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                max_ack_pending=max(10_000, self.slots),
                max_deliver=5,
            ),
        )
        self._pull = sub = await self.js.pull_subscribe_bind(durable=DURABLE, stream=WORK_STREAM)

        async def on_result(msg: Msg) -> None:
            self.completions.done(msg.subject[len(RESULT_PREFIX) :])

        self._sub = await self.nc.subscribe(RESULT_PREFIX + "*", cb=on_result)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._work(sub, self._stop))

    async def submit(self, key: str) -> None:
        await self.js.publish(WORK_SUBJECT, self.payload, headers={"Nats-Msg-Id": key})

    async def _handle(self, msg: Msg) -> None:
        key = msg.headers["Nats-Msg-Id"] if msg.headers else ""
        await self.js.publish(RESULT_PREFIX + key, self.result, headers={"Nats-Msg-Id": "r" + key})
        await msg.ack()

    async def _work(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        free = self.slots
        freed = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        def give(t: asyncio.Task[None]) -> None:
            nonlocal free
            tasks.discard(t)
            free += 1
            freed.set()

        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                if free == 0:
                    freed.clear()
                    waiter = asyncio.ensure_future(freed.wait())
                    await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                fetch = asyncio.ensure_future(sub.fetch(batch=free, timeout=1.0))
                done, _ = await asyncio.wait({fetch, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if fetch not in done:
                    fetch.cancel()
                    with contextlib.suppress(BaseException):
                        await fetch
                    break
                try:
                    msgs = fetch.result()
                except (TimeoutError, NatsTimeoutError):
                    continue
                for msg in msgs:
                    free -= 1
                    t = asyncio.create_task(self._handle(msg))
                    tasks.add(t)
                    t.add_done_callback(give)
        finally:
            stopping.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
        for sub in (self._sub, self._pull):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        for name in (WORK_STREAM, RESULT_STREAM):
            with contextlib.suppress(Exception):
                await self.js.delete_stream(name)
