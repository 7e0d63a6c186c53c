"""NATS being unavailable must not use up a work message's deliveries: a worker whose result
cannot be stored keeps its work message (in progress) and publishes again until it lands, and a
redelivered step whose chain state cannot be read is run, not failed. On a real nats-server that
is stopped and started again (the leaderless cluster cases are in tests/chaos)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import running, stream_count, wait_until

from chainyard.contracts import (
    Assignment,
    LlmStep,
    Message,
    Output,
    Target,
    Topology,
    encode,
    now_ms,
)
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.workers.runtime import Result, Worker

POOL = "sim"


def assignment() -> Assignment:
    return Assignment(
        chain_id="c1",
        step_id="s",
        attempt=1,
        tenant="acme",
        step=LlmStep(id="s", model="m", messages=[Message(role="user", content="hi")]),
        target=Target(deployment="d", pool=POOL, provider="openai", model="m"),
        dispatched_at_ms=now_ms(),
    )


async def _delivered(bus: Bus, topology: Topology) -> tuple[int, int]:
    info = await bus.js.consumer_info(topology.work.name, topology.pool_consumer(POOL).durable)
    return info.delivered.consumer_seq, info.num_redelivered


async def test_a_result_waits_out_a_nats_outage_without_a_redelivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topology = Topology()
    async with NatsServer() as server:
        bus = await open_bus(server.url, name="worker", topology=topology)
        # Each publish attempt gives up after 0.5 s: the worker itself must try again.
        bus.publisher.timeout = 0.5
        entered, release = asyncio.Event(), asyncio.Event()
        calls = 0

        async def execute(a: Assignment, on_delta: object) -> Result:
            nonlocal calls
            calls += 1
            entered.set()
            await release.wait()
            return Result(output=Output(text="done"))

        a = assignment()
        worker = Worker(bus, POOL, execute, slots=4)
        try:
            with caplog.at_level(logging.WARNING, logger="chainyard.worker"):
                async with running(worker):
                    await bus.publisher.publish(
                        topology.subjects.work(POOL), encode(a), headers={"Nats-Msg-Id": a.msg_id}
                    )
                    await asyncio.wait_for(entered.wait(), 10)
                    port = server.port
                    await server.stop(keep_store=True)
                    release.set()  # the result is due while there is no server
                    await wait_until(
                        lambda: any("not stored" in r.getMessage() for r in caplog.records),
                        10,
                        "a failed publish of the result",
                    )
                    server._port = port  # back on the same port and store, as restart() does
                    await server.start()
                    subject = topology.subjects.event("acme", "c1", "step.completed")
                    await wait_until(
                        lambda: stream_count(bus.js, topology.events.name, subject),
                        20,
                        "the step's result in the event stream",
                    )
                    await wait_until(
                        lambda: _queue_empty(bus, topology), 10, "the work message to be acked"
                    )
            # one delivery, one provider call, one stored result
            assert (calls, await _delivered(bus, topology)) == (1, (1, 0))
            assert await stream_count(bus.js, topology.events.name, subject) == 1
        finally:
            await bus.close()


async def test_a_worker_stopped_during_an_outage_gives_the_work_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It publishes again until it lands or the worker stops: a stop ends the retries, and the
    work stays in the queue (unacked) for another worker."""
    topology = Topology()
    async with NatsServer() as server:
        bus = await open_bus(server.url, name="worker", topology=topology)
        bus.publisher.timeout = 0.3

        async def execute(a: Assignment, on_delta: object) -> Result:
            return Result(output=Output(text="done"))

        a = assignment()
        worker = Worker(bus, POOL, execute, slots=4)
        try:
            with caplog.at_level(logging.WARNING, logger="chainyard.worker"):
                async with running(worker) as stop:
                    # The event stream refuses the result (its subject is gone: a 503 on every
                    # attempt, as when it has no leader), the work stream still takes work.
                    info = await bus.js.stream_info(topology.events.name)
                    cfg = info.config
                    cfg.subjects = ["elsewhere.>"]
                    await bus.js.update_stream(cfg)
                    await bus.publisher.publish(
                        topology.subjects.work(POOL), encode(a), headers={"Nats-Msg-Id": a.msg_id}
                    )
                    await wait_until(
                        lambda: any("not stored" in r.getMessage() for r in caplog.records),
                        10,
                        "a failed publish of the result",
                    )
                    assert worker.completed == 0
                    stop.set()
            assert await _delivered(bus, topology) == (1, 0)
            assert not await _queue_empty(bus, topology)  # given back, not acked nor lost
        finally:
            await bus.close()


async def _queue_empty(bus: Bus, topology: Topology) -> bool:
    return (await bus.js.stream_info(topology.work.name)).state.messages == 0
