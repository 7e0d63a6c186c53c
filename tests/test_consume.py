"""consume(): how many pull requests a consumer keeps waiting at the server (one at a time),
and how fast a backlog fills free slots, on a real one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from helpers import wait_until
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from chainyard.runtime.consume import Durable, Slots, consume, release_slot
from chainyard.runtime.nats import Bus

STREAM, DURABLE = "CONSUME", "pool"


async def _waiting(bus: Bus) -> int:
    return (await bus.js.consumer_info(STREAM, DURABLE)).num_waiting


@contextlib.asynccontextmanager
async def idle_workers(
    bus: Bus,
    n: int,
    seen: list[bytes],
    hold: asyncio.Event | None = None,
    request_expires_s: float = 1.0,
) -> AsyncIterator[None]:
    """n consume loops with 10,000 slots each, on one durable consumer. With `hold`, a handler
    records its message, then waits for `hold` before it acks."""
    await bus.js.add_stream(
        StreamConfig(name=STREAM, subjects=["consume.>"], retention=RetentionPolicy.WORK_QUEUE)
    )
    await bus.js.add_consumer(
        STREAM,
        ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000),
    )

    async def handler(msg: Msg) -> None:
        seen.append(msg.data)
        if hold is not None:
            await hold.wait()
        await msg.ack()

    stop = asyncio.Event()
    tasks = []
    for i in range(n):
        sub = Durable(bus.nc, STREAM, DURABLE)
        tasks.append(
            asyncio.create_task(
                consume(
                    sub,
                    handler,
                    stop,
                    10_000,
                    name=f"w{i}",
                    max_batch=256,
                    request_expires_s=request_expires_s,
                )
            )
        )
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_an_idle_worker_keeps_one_request_waiting(bus: Bus) -> None:
    seen: list[bytes] = []
    async with idle_workers(bus, 1, seen):
        await wait_until(lambda: _count_at_least(bus, 1), 10, "a pull request")
        samples = [await _waiting(bus) for _ in range(10)]
        assert max(samples) <= 1  # it was 10,000 / 256 = 40 before requests were capped
        payloads = [b"m%d" % i for i in range(3000)]  # more than the requests asked for
        await asyncio.gather(*(bus.publisher.publish("consume.x", p) for p in payloads))
        await wait_until(lambda: len(seen) >= len(payloads), 10, "every message")
    assert sorted(seen) == sorted(payloads)


async def test_twenty_idle_workers_stay_under_max_waiting(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[bytes] = []
    with caplog.at_level(logging.WARNING, logger="chainyard.consume"):
        async with idle_workers(bus, 20, seen):
            await wait_until(lambda: _count_at_least(bus, 20), 10, "a request from each")
            await asyncio.gather(
                *(bus.publisher.publish("consume.x", b"%d" % i) for i in range(2000))
            )
            await wait_until(lambda: len(seen) >= 2000, 10, "every message")
    assert len(seen) == 2000 and len(set(seen)) == 2000
    refused = [r.getMessage() for r in caplog.records if "pull request ended" in r.getMessage()]
    assert not refused  # 20 x 40 requests used to exceed the server's 512 (409 Max Waiting)


async def test_a_backlog_fills_every_free_slot_without_waiting_for_a_handler(bus: Bus) -> None:
    # 5,000 queued, 10,000 slots, handlers that do not end: the worker fetches 256 at a time,
    # and must fetch again as each fetch is served, not when a handler ends (none does here)
    # nor at the next request expiry (60 s away).
    payloads = [b"b%d" % i for i in range(5000)]
    seen: list[bytes] = []
    hold = asyncio.Event()
    try:
        async with idle_workers(bus, 1, seen, hold, request_expires_s=60.0):
            await asyncio.gather(*(bus.publisher.publish("consume.x", p) for p in payloads))
            await wait_until(lambda: len(seen) >= len(payloads), 10, "every message started")
            hold.set()
    finally:
        hold.set()
    assert sorted(seen) == sorted(payloads)


async def _count_at_least(bus: Bus, n: int) -> bool:
    return await _waiting(bus) >= n


async def test_a_released_slot_starts_the_next_message_and_stop_still_waits_for_its_handler(
    bus: Bus,
) -> None:
    # One slot. The first handler gives its slot back, then waits: the second message starts
    # meanwhile; on stop, consume() still waits for the first handler to return.
    await bus.js.add_stream(
        StreamConfig(name=STREAM, subjects=["consume.>"], retention=RetentionPolicy.WORK_QUEUE)
    )
    await bus.js.add_consumer(
        STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT)
    )
    started: list[bytes] = []
    finish = asyncio.Event()
    finished: list[bytes] = []
    slots = Slots(1)

    async def handler(msg: Msg) -> None:
        started.append(msg.data)
        if msg.data == b"first":
            release_slot()
            release_slot()  # twice: still one slot given back
            await finish.wait()
        await msg.ack()
        finished.append(msg.data)

    release_slot()  # outside a handler: nothing to give back
    stop = asyncio.Event()
    sub = Durable(bus.nc, STREAM, DURABLE)
    task = asyncio.create_task(consume(sub, handler, stop, 1, name="one", slots=slots))
    await bus.publisher.publish("consume.x", b"first")
    await wait_until(lambda: started == [b"first"], 10, "the first message")
    await bus.publisher.publish("consume.x", b"second")
    # the first holds no slot, the second gives its own back once its task is done
    await wait_until(
        lambda: finished == [b"second"] and slots.free == 1, 10, "the second, beside the first"
    )
    stop.set()
    await asyncio.sleep(0)
    assert not task.done()  # the first handler is still running
    finish.set()
    await asyncio.wait_for(task, 10)
    assert finished == [b"second", b"first"] and slots.free == 1
