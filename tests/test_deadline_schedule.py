"""Chain deadlines are message schedules, on a real nats-server: the server holds each one until
it is due, so a router handles a deadline once, when it fires; a chain that ends before it
removes its schedule, so its deadline never fires. Two router replicas, two tenants reusing one
chain id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from helpers import kill_all, running, start_routers, stream_count, wait_until

from chainyard.client import Client
from chainyard.contracts import Chain, ChainCompleted, ChainFailed, Config, WaitStep
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus, ensure_stream, open_bus, stream_config
from chainyard.runtime.server import NatsServer

DEADLINE_MS = 2000


def held(chain_id: str, deadline_ms: int) -> Chain:
    """A chain that waits for a signal nobody sends unless the test does."""
    return Chain(id=chain_id, deadline_ms=deadline_ms, steps=[WaitStep(id="hold", signal="go")])


def holds(bus: Bus, subject: str, n: int) -> Callable[[], Awaitable[bool]]:
    """A check for `wait_until`: the timers stream holds `n` messages on `subject`."""

    async def check() -> bool:
        return await stream_count(bus.js, bus.topology.timers.name, subject) == n

    return check


async def deliveries(bus: Bus) -> int:
    """How many messages the routers' deadline consumer has been handed, redeliveries too."""
    info = await bus.js.consumer_info(
        bus.topology.timers.name, bus.topology.deadlines_consumer.durable
    )
    return info.delivered.consumer_seq


@pytest.fixture
async def routers(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[None]:
    """Two `chainyard router` processes with the default config, as deployed."""
    cfg = tmp_path / "chainyard.toml"
    cfg.write_text("")
    procs = await start_routers(tmp_path, nats_server.url, cfg)
    try:
        yield
    finally:
        await kill_all(procs)


async def test_deadlines_wait_in_the_server_and_fire_once(bus: Bus, routers: None) -> None:
    topo = bus.topology
    clients = {t: Client(bus.nc, t, topo) for t in ("acme", "beta")}
    # Both tenants run chain id "same" to its deadline; acme's "quick" ends first.
    assert await clients["acme"].submit(held("quick", 300_000)) == "quick"
    ends = {
        t: asyncio.create_task(c.run(held("same", DEADLINE_MS), timeout=30))
        for t, c in clients.items()
    }
    schedules = topo.subjects.deadline_schedule("*", "*", "*")
    await wait_until(
        holds(bus, schedules, 3),
        15,
        "three deadline schedules in the timers stream",
    )
    await clients["acme"].signal("quick", "go")
    for tenant, end in ends.items():
        ended = await end
        assert isinstance(ended, ChainFailed), (tenant, ended)
        assert ended.tenant == tenant and ended.chain_id == "same"
        assert ended.reason.startswith(f"deadline exceeded ({DEADLINE_MS} ms)")
        assert ended.duration_ms >= DEADLINE_MS
    quick_end = await clients["acme"].run(held("quick", 300_000), timeout=10)
    assert isinstance(quick_end, ChainCompleted)
    # The two that fired were handed over once each, never naked back to wait; the quick
    # chain, which ended first, removed its deadline's schedule (the roll-up that did it
    # expires too), so nothing of it is left to fire.
    await wait_until(
        holds(bus, topo.subjects.all_deadlines, 0),
        10,
        "the fired deadlines to be acknowledged",
    )
    assert await deliveries(bus) == 2
    await wait_until(holds(bus, schedules, 0), 10, "the quick chain's schedule to be gone")


async def test_a_chain_that_ends_first_never_has_its_deadline_fire(bus: Bus, routers: None) -> None:
    topo = bus.topology
    acme, beta = (Client(bus.nc, t, topo) for t in ("acme", "beta"))
    # acme's "same" ends at once; beta's "same" is due half a second after acme's would be
    assert await acme.submit(held("same", DEADLINE_MS)) == "same"
    beta_end = asyncio.create_task(beta.run(held("same", DEADLINE_MS + 500), timeout=30))
    schedules = topo.subjects.deadline_schedule("*", "*", "*")
    await wait_until(holds(bus, schedules, 2), 15, "both deadline schedules")
    await acme.signal("same", "go")
    assert isinstance(await acme.run(held("same", DEADLINE_MS), timeout=10), ChainCompleted)
    # The server fires schedules in due order within a 250 ms tick: once beta's has fired,
    # acme's would have, had it still been there.
    ended = await beta_end
    assert isinstance(ended, ChainFailed) and ended.tenant == "beta", ended
    assert ended.reason.startswith(f"deadline exceeded ({DEADLINE_MS + 500} ms)")
    await wait_until(
        holds(bus, topo.subjects.all_deadlines, 0), 10, "beta's deadline to be acknowledged"
    )
    assert await deliveries(bus) == 1  # beta's alone: acme's schedule was removed
    await wait_until(holds(bus, schedules, 0), 10, "acme's roll-up to expire")


async def test_without_schedules_a_deadline_waits_as_a_naked_message(bus: Bus) -> None:
    """The path for a server without message schedules (before nats-server 2.12)."""
    router = Router(bus, Config())
    router.deadline_schedules = False
    async with running(router):
        ended = await Client(bus.nc, "acme", bus.topology).run(held("same", 500), timeout=30)
    assert isinstance(ended, ChainFailed) and ended.reason.startswith("deadline exceeded")
    schedules = bus.topology.subjects.deadline_schedule("*", "*", "*")
    assert await stream_count(bus.js, bus.topology.timers.name, schedules) == 0
    assert await deliveries(bus) >= 2  # handed over at once, naked, handed over when due


async def test_an_older_timers_stream_gets_schedules_and_keeps_its_messages(
    nats_server: NatsServer,
) -> None:
    bus = await open_bus(nats_server.url, name="first")
    try:
        timers = bus.topology.timers
        await bus.js.delete_stream(timers.name)
        old = stream_config(timers, 1)
        old.subjects = [bus.topology.subjects.all_timers, bus.topology.subjects.all_deadlines]
        old.allow_msg_schedules, old.allow_rollup_hdrs, old.allow_msg_ttl = None, False, None
        await bus.js.add_stream(old)
        await bus.js.publish(bus.topology.subjects.deadline("acme", "c1"), b"a timer")
        await ensure_stream(bus.js, timers, 1)
        info = await bus.js.stream_info(timers.name)
        assert info.config.allow_msg_schedules and info.config.allow_rollup_hdrs
        assert info.config.allow_msg_ttl  # an ended chain's roll-up of its schedule expires
        assert bus.topology.subjects.all_schedules in (info.config.subjects or [])
        assert info.state.messages == 1
    finally:
        await bus.close()
