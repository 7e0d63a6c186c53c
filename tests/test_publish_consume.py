"""The JetStream publisher (runtime/nats.py `Publisher`) and the pull consumer loop
(runtime/consume.py), on a real nats-server: acks, error replies, timeouts, leaderless streams,
restarts, bounds, naks, stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from helpers import wait_until
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError

from chainyard.runtime.consume import Durable, Slots, consume
from chainyard.runtime.nats import Bus, Publisher, open_bus
from chainyard.runtime.server import NatsServer

STREAM, SUBJECT, DURABLE = "LEAN", "lean.work", "lean-w"


async def _stream(bus: Bus) -> None:
    cfg = StreamConfig(name=STREAM, subjects=["lean.>"], retention=RetentionPolicy.WORK_QUEUE)
    await bus.js.add_stream(cfg)


async def _consumer(bus: Bus, ack_wait: float = 30.0) -> None:
    cfg = ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait)
    await bus.js.add_consumer(STREAM, cfg)


async def _bind(bus: Bus) -> Durable:
    return Durable(bus.nc, STREAM, DURABLE)


class Seen:
    """Messages a handler saw, and an event per count reached."""

    def __init__(self) -> None:
        self.msgs: list[Msg] = []
        self._changed = asyncio.Condition()

    async def add(self, msg: Msg) -> None:
        async with self._changed:
            self.msgs.append(msg)
            self._changed.notify_all()

    async def wait(self, count: int, timeout: float = 10.0) -> None:
        async def reached() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.msgs) >= count)

        await asyncio.wait_for(reached(), timeout)


@contextlib.asynccontextmanager
async def consuming(
    bus: Bus, handler: Callable[[Msg], Awaitable[None]], concurrency: int = 8, **kw: object
) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    sub = await _bind(bus)
    rebind = kw.pop("rebind", None)
    task = asyncio.create_task(
        consume(sub, handler, stop, concurrency, name="t", rebind=rebind, **kw)  # type: ignore[arg-type]
    )
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


# -- publisher ------------------------------------------------------------------------------


async def test_publish_acks_like_js_publish_and_dedups(bus: Bus) -> None:
    await _stream(bus)
    p = bus.publisher
    a = await p.publish(SUBJECT, b"one", headers={"Nats-Msg-Id": "m1", "traceparent": "tp"})
    b = await p.publish(SUBJECT, b"two")
    again = await p.publish(SUBJECT, b"one", headers={"Nats-Msg-Id": "m1"})
    assert (a.stream, a.seq, b.seq) == (STREAM, 1, 2)
    assert not a.duplicate and again.duplicate and again.seq == 1
    many = await asyncio.gather(*(p.publish(SUBJECT, b"x%d" % i) for i in range(200)))
    assert sorted(x.seq for x in many) == list(range(3, 203))
    got = await bus.js.get_msg(STREAM, 1)
    assert got.headers == {"Nats-Msg-Id": "m1", "traceparent": "tp"}


async def test_error_replies_raise_what_nats_py_raises(bus: Bus) -> None:
    await _stream(bus)
    p = bus.publisher
    await p.publish(SUBJECT, b"one")
    with pytest.raises(APIError) as wrong_seq:
        await p.publish(SUBJECT, b"two", headers={"Nats-Expected-Last-Sequence": "7"})
    assert wrong_seq.value.err_code == 10071  # wrong last sequence
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(NoStreamResponseError):  # what js.publish raises, once its time is up
        await p.publish("nostream.here", b"x", timeout=0.3)
    assert loop.time() - t0 >= 0.15  # sent again meanwhile (after 0.05 + 0.1 s), not at once
    assert (await p.publish(SUBJECT, b"three")).seq == 2  # still fine afterwards


async def test_a_publish_no_stream_takes_yet_is_sent_again_until_one_does(bus: Bus) -> None:
    """A stream without a leader (an election) answers 503 like a missing one: the publish is
    sent again until its timeout, so it lands once a stream takes the subject."""
    p = bus.publisher
    pending = asyncio.create_task(p.publish(SUBJECT, b"early", headers={"Nats-Msg-Id": "e1"}))
    await asyncio.sleep(0)  # its first attempt is written before the stream is created: a 503
    await _stream(bus)
    ack = await asyncio.wait_for(pending, 10)
    assert (ack.stream, ack.seq) == (STREAM, 1) and not ack.duplicate
    assert (await bus.js.stream_info(STREAM)).state.messages == 1


async def test_a_publish_with_no_reply_times_out(bus: Bus) -> None:
    silent = await bus.nc.subscribe("silent.subject")  # takes it, never answers
    p = Publisher(bus.js, timeout=0.2)
    with pytest.raises(NatsTimeoutError):
        await p.publish("silent.subject", b"x")
    with pytest.raises(TimeoutError):  # nats' TimeoutError is also the builtin one
        await p.publish("silent.subject", b"x", timeout=0.05)
    # a short timeout beside a long one still ends on time
    long = asyncio.create_task(p.publish("silent.subject", b"x", timeout=30))
    with pytest.raises(NatsTimeoutError):
        await asyncio.wait_for(p.publish("silent.subject", b"y", timeout=0.05), 2)
    assert not long.done()
    long.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await long
    await silent.unsubscribe()


async def test_publisher_survives_a_server_restart() -> None:
    async with NatsServer() as server:
        bus = await open_bus(server.url, name="publish-restart")
        try:
            await _stream(bus)
            p = bus.publisher
            assert (await p.publish(SUBJECT, b"before")).seq == 1
            port = server.port
            await server.stop(keep_store=True)
            # while the server is down the publish waits in nats-py's buffer: it times out, it
            # does not hang (NATS-NOTES: a full buffer raises at once)
            with pytest.raises(NatsTimeoutError):
                await p.publish(SUBJECT, b"during", timeout=0.5)
            server._port = port  # back on the same port, as restart() does
            await server.start()
            for _ in range(100):  # until the client has reconnected and the stream is back
                try:
                    ack = await p.publish(SUBJECT, b"after", timeout=0.5)
                    break
                except (NatsTimeoutError, NoRespondersError, NoStreamResponseError, APIError):
                    continue
            else:
                pytest.fail("no publish went through after the restart")
            assert ack.stream == STREAM and ack.seq >= 2
        finally:
            await bus.close()


# -- consumer -------------------------------------------------------------------------------


async def test_bounded_concurrency_and_shared_slots(bus: Bus) -> None:
    await _stream(bus)
    await _consumer(bus)
    n, limit = 60, 4
    seen = Seen()
    slots = Slots(limit)
    running = peak = 0
    low = limit
    full = asyncio.Event()  # every slot taken once: a backlog fills them all

    async def handler(msg: Msg) -> None:
        nonlocal running, peak, low
        running += 1
        peak, low = max(peak, running), min(low, slots.free)
        if running == limit:
            full.set()
        await asyncio.wait_for(full.wait(), 10)  # the first ones hold their slots until then
        for _ in range(5):  # work that yields to the loop
            await asyncio.sleep(0)
        running -= 1
        await msg.ack()
        await seen.add(msg)

    for i in range(n):
        await bus.publisher.publish(SUBJECT, b"%d" % i)
    async with consuming(bus, handler, limit, slots=slots):
        await seen.wait(n)
    assert peak == limit and low == 0
    assert sorted(int(m.data) for m in seen.msgs) == list(range(n))
    assert slots.free == limit
    info = await bus.js.consumer_info(STREAM, DURABLE)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_handler_error_naks_and_the_message_comes_back(bus: Bus) -> None:
    await _stream(bus)
    await _consumer(bus)
    seen = Seen()

    async def handler(msg: Msg) -> None:
        await seen.add(msg)
        if msg.metadata.num_delivered == 1:
            raise RuntimeError("first time fails")
        await msg.ack()

    await bus.publisher.publish(SUBJECT, b"x")
    async with consuming(bus, handler):
        await seen.wait(2)
    assert [m.metadata.num_delivered for m in seen.msgs] == [1, 2]


async def test_requests_expire_and_are_renewed_while_idle(bus: Bus) -> None:
    await _stream(bus)
    await _consumer(bus)
    seen = Seen()
    statuses: list[str] = []

    async def handler(msg: Msg) -> None:
        await msg.ack()
        await seen.add(msg)

    async with consuming(bus, handler, request_expires_s=0.1):
        # a message long after the first requests expired (408) still arrives
        waiter = asyncio.get_running_loop().create_future()

        async def note(m: Msg) -> None:
            statuses.append(m.data.decode())
            if len(statuses) >= 3 and not waiter.done():
                waiter.set_result(None)

        probe = await bus.nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=note)
        await asyncio.wait_for(waiter, 5)  # several pull requests went out, one per expiry
        await probe.unsubscribe()
        await bus.publisher.publish(SUBJECT, b"late")
        await seen.wait(1)
    assert len(statuses) >= 3


async def test_a_refused_request_is_not_repeated_in_a_hot_loop(bus: Bus) -> None:
    """A consumer that takes one waiting request, already taken by another client: the server
    refuses the loop's every request (409 Exceeded MaxWaiting). It asks again after a pause,
    not at once, thousands of times a second."""
    await _stream(bus)
    cfg = ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, max_waiting=1)
    await bus.js.add_consumer(STREAM, cfg)
    other = await bus.nc.subscribe(bus.nc.new_inbox())  # the one waiting request, for 30 s
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{DURABLE}"
    await bus.nc.publish(next_subject, b'{"batch": 1, "expires": 30000000000}', other.subject)
    await bus.nc.flush()
    requests: list[bytes] = []

    async def note(m: Msg) -> None:
        requests.append(m.data)

    async def never(msg: Msg) -> None:
        raise AssertionError("a refused request delivered a message")

    probe = await bus.nc.subscribe(next_subject, cb=note)
    async with consuming(bus, never, 4):
        await wait_until(lambda: len(requests) >= 2, 5, "a request, refused, then another")
        await asyncio.sleep(1.0)  # how many more in a second: the pause is what is measured
    await probe.unsubscribe()
    await other.unsubscribe()
    assert 2 <= len(requests) <= 12, len(requests)


async def test_deleted_consumer_is_rebound(bus: Bus) -> None:
    await _stream(bus)
    await _consumer(bus)
    seen = Seen()

    async def handler(msg: Msg) -> None:
        # acked for sure before the test deletes the consumer: a plain ack still in flight then
        # is lost with the consumer, and the work queue rightly delivers "1" again
        await msg.ack_sync()
        await seen.add(msg)

    async def rebind() -> Durable:
        with contextlib.suppress(APIError):
            await _consumer(bus)
        return await _bind(bus)

    async with consuming(bus, handler, request_expires_s=0.1, rebind=rebind):
        await bus.publisher.publish(SUBJECT, b"1")
        await seen.wait(1)
        await bus.js.delete_consumer(STREAM, DURABLE)  # 409 consumer deleted, then 503s
        await bus.publisher.publish(SUBJECT, b"2")
        await seen.wait(2, timeout=15)  # rebind re-creates the consumer
    assert [m.data for m in seen.msgs] == [b"1", b"2"]


async def test_consumer_goes_on_after_a_server_restart() -> None:
    async with NatsServer() as server:
        bus = await open_bus(server.url, name="consume-restart")
        seen = Seen()

        async def handler(msg: Msg) -> None:
            await msg.ack()
            await seen.add(msg)

        try:
            await _stream(bus)
            await _consumer(bus)
            async with consuming(bus, handler, request_expires_s=0.2):
                await bus.publisher.publish(SUBJECT, b"before")
                await seen.wait(1)
                await server.restart()
                for _ in range(100):
                    try:
                        await bus.publisher.publish(SUBJECT, b"after", timeout=0.5)
                        break
                    except (NatsTimeoutError, NoRespondersError, APIError):
                        continue
                await seen.wait(2, timeout=15)
            assert [m.data for m in seen.msgs] == [b"before", b"after"]
        finally:
            await bus.close()


async def test_gate_holds_pulls_and_stop_finishes_in_flight(bus: Bus) -> None:
    await _stream(bus)
    await _consumer(bus, ack_wait=60.0)
    open_gate = asyncio.Event()
    started, release = Seen(), asyncio.Event()
    finished: list[bytes] = []

    async def gate() -> None:
        await open_gate.wait()

    async def handler(msg: Msg) -> None:
        await started.add(msg)
        await release.wait()
        await msg.ack()
        finished.append(msg.data)

    await bus.publisher.publish(SUBJECT, b"a")
    async with consuming(bus, handler, 1, gate=gate) as stop:
        info = await bus.js.consumer_info(STREAM, DURABLE)
        assert not started.msgs and info.num_waiting == 0  # gated: not even a pull request
        open_gate.set()
        await started.wait(1)
        await bus.publisher.publish(SUBJECT, b"b")  # no free slot: stays in the stream
        stop.set()
        release.set()
    assert finished == [b"a"]  # the one in flight finished
    # b is free for another consumer at once (not held until ack_wait by a stale request)
    other = Seen()

    async def take(msg: Msg) -> None:
        await msg.ack()
        await other.add(msg)

    async with consuming(bus, take):
        await other.wait(1, timeout=5)
    assert [m.data for m in other.msgs] == [b"b"]


async def test_requests_outstanding_at_stop_do_not_hold_messages(bus: Bus) -> None:
    await _stream(bus)
    await _consumer(bus, ack_wait=60.0)

    async def never(msg: Msg) -> None:
        raise AssertionError(f"delivered to a stopped consumer: {msg.data!r}")

    async with consuming(bus, never, 4, request_expires_s=30.0):
        for _ in range(100):  # until its pull request (4 messages, 30 s) is waiting
            if (await bus.js.consumer_info(STREAM, DURABLE)).num_waiting:
                break
        else:
            pytest.fail("no pull request waiting")
    await bus.publisher.publish(SUBJECT, b"after")
    other = Seen()

    async def take(msg: Msg) -> None:
        await msg.ack()
        await other.add(msg)

    async with consuming(bus, take):
        await other.wait(1, timeout=5)  # not held by the stopped one's request until ack_wait
    assert [m.data for m in other.msgs] == [b"after"]
