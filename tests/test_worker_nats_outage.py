"""NATS being unavailable must not use up a work message's deliveries: a worker whose result
cannot be stored keeps its work message (in progress) and publishes again until it lands, and a
redelivered step whose chain state cannot be read is run, not failed. On a real nats-server that
is stopped and started again (the leaderless cluster cases are in tests/chaos)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import running, stream_count, wait_until, work_queue_empty
from worker_support import POOL, HeldCalls, assignment

from chainyard.contracts import (
    Topology,
    encode,
)
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.workers.runtime import Worker


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
        execute = HeldCalls()
        a = assignment("c1")
        worker = Worker(bus, POOL, execute, slots=4)
        try:
            with caplog.at_level(logging.WARNING, logger="chainyard.worker"):
                async with running(worker):
                    await bus.publisher.publish(
                        topology.subjects.work(POOL), encode(a), headers={"Nats-Msg-Id": a.msg_id}
                    )
                    await asyncio.wait_for(execute.entered.wait(), 10)
                    port = server.port
                    await server.stop(keep_store=True)
                    execute.release.set()  # the result is due while there is no server
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
                        lambda: work_queue_empty(bus.js, topology), 10, "the work message acked"
                    )
            # one delivery, one provider call, one stored result
            assert (execute.calls, await _delivered(bus, topology)) == (1, (1, 0))
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

        a = assignment("c1")
        worker = Worker(bus, POOL, HeldCalls(held=False), slots=4)
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
            assert not await work_queue_empty(bus.js, topology)  # given back, not acked nor lost
        finally:
            await bus.close()
