"""Breakers shared through KV: results are counted once per router, per tenant's identity; the
routers' views of KV (breakers, capacity) outlive a restart of nats-server."""

from __future__ import annotations

import asyncio
import contextlib

from helpers import wait_until
from nats.errors import Error as NatsError

from chainyard.contracts import (
    Config,
    Deployment,
    ErrorInfo,
    Heartbeat,
    StepCompleted,
    StepFailed,
    Target,
    Usage,
    encode,
    now_ms,
)
from chainyard.router.breakers import CLOSED, Breakers, next_state
from chainyard.router.capacity import CapacityView
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer

TARGET = Target(deployment="d", pool="p", provider="openai", model="m")
CFG = Config(deployments=[Deployment(name="d", pool="p", model="m")], breaker_failures=3)


def failure(tenant: str, chain: str = "x", started_at_ms: int = 0) -> StepFailed:
    return StepFailed(
        chain_id=chain, step_id="s", attempt=1, tenant=tenant,
        error=ErrorInfo(cls="retryable", message="HTTP 500", status=500),
        target=TARGET, worker="w", started_at_ms=started_at_ms, latency_ms=10.0,
    )  # fmt: skip


def success(started_at_ms: int) -> StepCompleted:
    return StepCompleted(
        chain_id="ok", step_id="s", attempt=1, tenant="ta", output="fine", usage=Usage(),
        target=TARGET, worker="w", dispatched_at_ms=started_at_ms, started_at_ms=started_at_ms,
        latency_ms=10.0,
    )  # fmt: skip


def test_a_failure_older_than_the_last_success_does_not_count() -> None:
    """A late failure (a redelivery after a router died) that ended before the success which
    closed the breaker says nothing about the deployment now."""
    b = next_state(CLOSED, failure("ta", "a", started_at_ms=1_000), CFG, 1_100)
    assert b is not None and b.failures == 1
    b = next_state(b, success(started_at_ms=2_000), CFG, 2_100)
    assert b is not None and b.failures == 0 and b.reset_ms == 2_010
    assert next_state(b, failure("ta", "late", started_at_ms=1_500), CFG, 3_000) is None
    after = next_state(b, failure("ta", "new", started_at_ms=2_500), CFG, 3_000)
    assert after is not None and after.failures == 1


def test_a_failure_counts_once_whoever_sees_it_again() -> None:
    b = next_state(CLOSED, failure("ta"), CFG, 1)
    assert b is not None and b.failures == 1
    assert next_state(b, failure("ta"), CFG, 2) is None  # the same result, seen again
    again = next_state(b, failure("tb"), CFG, 2)  # another tenant's same ids: another call
    assert again is not None and again.failures == 2


async def test_two_replicas_count_a_redelivered_failure_once(bus: Bus) -> None:
    """Router A records a failure, dies before acking; router B gets the event again: the
    shared value remembers it was counted."""
    a, b = Breakers(bus.breakers, CFG), Breakers(bus.breakers, CFG)
    await a.start()
    await b.start()
    try:
        a.observe(failure("ta"))
        await wait_until(lambda: b.status("d").failures == 1, 5, "B sees A's record")
        b.observe(failure("ta"))
        b.observe(failure("tb"))
        await wait_until(lambda: a.status("d").failures == 2, 5, "A sees B's one new record")
        assert b.status("d").failures == 2 and b.status("d").status == "closed"
    finally:
        await a.stop()
        await b.stop()


async def test_two_tenants_same_ids_are_two_results(bus: Bus) -> None:
    """The same (chain, step, attempt) under two tenants is two calls that failed: both count,
    while a repeat of one tenant's result (a redelivered event) counts once."""
    breakers = Breakers(bus.breakers, CFG)
    await breakers.start()
    try:
        for tenant in ("ta", "ta", "tb"):
            breakers.observe(failure(tenant))
        await wait_until(lambda: breakers.status("d").failures == 2, 5, "two failures recorded")
        breakers.observe(failure("tc"))
        await wait_until(lambda: breakers.status("d").status == "open", 5, "the breaker open")
    finally:
        await breakers.stop()


async def test_replicas_keep_seeing_each_other_after_nats_restarts() -> None:
    """A restart of nats-server (same store) ends the watch's consumer without a word from
    nats-py: each replica must still see what the other records afterwards."""
    async with NatsServer() as server:
        buses = [await open_bus(server.url, name=f"router-{i}") for i in range(2)]
        a, b = (Breakers(bus.breakers, CFG) for bus in buses)
        await a.start()
        await b.start()
        try:
            a.observe(failure("ta", "before"))
            await wait_until(lambda: b.status("d").failures == 1, 5, "B sees A's record")
            await server.restart()
            for i in range(200):  # until JetStream answers again: A records, B must see it
                a.observe(failure("ta", f"after-{i}"))
                if a.status("d").failures >= 2:
                    break
                await asyncio.sleep(0.05)  # a retry period while the server comes back
            await wait_until(lambda: b.status("d").failures >= 2, 15, "B sees A after restart")
        finally:
            await a.stop()
            await b.stop()
            for bus in buses:
                await bus.close()


async def test_capacity_follows_heartbeats_after_nats_restarts() -> None:
    """The same for the heartbeats: a router that stopped seeing them would route nothing."""
    async with NatsServer() as server:
        bus = await open_bus(server.url, name="router")
        view = CapacityView(bus.capacity)
        await view.start()
        try:
            await server.restart()
            for _ in range(200):  # until JetStream answers again
                with contextlib.suppress(NatsError, OSError):
                    beat = Heartbeat(
                        pool="p", worker="w1", slots_total=4, slots_free=3, at_ms=now_ms(),
                        interval_ms=60_000,
                    )  # fmt: skip
                    await bus.capacity.put("p.w1", encode(beat))
                    break
            await wait_until(lambda: len(view.fresh("p")) == 1, 15, "the heartbeat seen")
        finally:
            await view.stop()
            await bus.close()
