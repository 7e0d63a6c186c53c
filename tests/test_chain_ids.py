"""Chain ids are per tenant: two tenants may pick the same id and never touch each other; within
a tenant an id is taken once (the same chain again is accepted once, a different one is refused
and the client says so). The router and workers run in-process on a real nats-server; the
sandbox provider echoes the prompt, so each chain's output shows whose steps produced it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import Events, running, wait_until

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainRejected,
    Config,
    Deployment,
    LlmStep,
    Message,
    PoolConfig,
    StepCompleted,
    StepFailed,
    chain_digest,
    encode,
)
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.stack import build


def ask(sid: str, text: str) -> LlmStep:
    return LlmStep(id=sid, model="m", messages=[Message(role="user", content=text)])


def two_steps(chain_id: str, topic: str) -> Chain:
    return Chain(id=chain_id, steps=[ask("a", topic), ask("b", "then {{steps.a.output}}")])


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(SandboxConfig(latency_ms=20)) as s:
        yield s


@pytest.fixture
async def stack(nats_server: NatsServer, sandbox: SandboxServer) -> AsyncIterator[None]:
    """Two router replicas and two workers, each on a connection of its own, as deployed."""
    cfg = Config(
        deployments=[Deployment(name="d", pool="p", model="m")],
        pools=[PoolConfig(name="p", base_url=sandbox.url + "/v1", slots=16, timeout_s=30)],
    )
    buses = [await open_bus(nats_server.url, name=f"replica-{i}") for i in range(2)]
    try:
        async with running(*(r for b in buses for r in build(b, cfg).runners)):
            yield
    finally:
        for b in buses:
            await b.close()


async def clients(server: NatsServer, *tenants: str) -> list[Client]:
    return [await Client.connect(server.url, t) for t in tenants]


@pytest.mark.usefixtures("stack")
async def test_two_tenants_same_ids_each_runs_its_own(nats_server: NatsServer) -> None:
    ta, tb = await clients(nats_server, "ta", "tb")
    try:
        ids = [f"same-{i}" for i in range(10)]
        ends = await asyncio.gather(
            *(ta.run(two_steps(i, f"alpha {i}"), timeout=30) for i in ids),
            *(tb.run(two_steps(i, f"beta {i}"), timeout=30) for i in ids),
        )
    finally:
        await ta.close()
        await tb.close()
    for k, ev in enumerate(ends):
        tenant, topic = ("ta", "alpha") if k < len(ids) else ("tb", "beta")
        i = ids[k % len(ids)]
        assert isinstance(ev, ChainCompleted), ev
        assert (ev.tenant, ev.chain_id) == (tenant, i)
        assert ev.output.text == f"echo: then echo: {topic} {i}"
        assert ev.digest == chain_digest(encode(two_steps(i, f"{topic} {i}")))


@pytest.mark.usefixtures("stack")
async def test_same_chain_again_answers_with_its_first_run(
    nats_server: NatsServer, sandbox: SandboxServer
) -> None:
    (ta,) = await clients(nats_server, "ta")
    async with ta:
        chain = two_steps("again", "once")
        first = await ta.run(chain, timeout=30)
        second = await ta.run(chain, timeout=30)  # ended long ago: its end comes from the log
        third = await asyncio.gather(ta.run(chain, timeout=30), ta.run(chain, timeout=30))
    assert isinstance(first, ChainCompleted)
    assert second == first and third == [first, first]
    assert sandbox.counts["openai.chat"] == 2  # two steps, run once


@pytest.mark.usefixtures("stack")
async def test_a_different_chain_under_a_used_id_is_refused_and_said_so(
    nats_server: NatsServer, sandbox: SandboxServer, bus: Bus
) -> None:
    (ta,) = await clients(nats_server, "ta")
    async with ta, Events(bus.nc, "cy.events.ta.taken.>") as ev:
        await sandbox.configure(latency_ms=300)
        running_one = asyncio.create_task(ta.run(two_steps("taken", "first"), timeout=30))
        await ev.wait(lambda e: isinstance(e, StepCompleted), timeout=10)
        # while the first runs, and after it ended: refused each time, the first untouched
        during = await ta.run(two_steps("taken", "other"), timeout=30)
        first = await running_one
        after = await ta.run(two_steps("taken", "another"), timeout=30)
    for refused in (during, after):
        assert isinstance(refused, ChainRejected) and refused.id_in_use, refused
        assert refused.errors[0].path == "$.id" and "already used" in refused.errors[0].message
    assert isinstance(first, ChainCompleted) and first.output.text == "echo: then echo: first"
    assert during.intake_seq != after.intake_seq
    assert sandbox.counts["openai.chat"] == 2


@pytest.mark.usefixtures("stack")
async def test_a_tenants_cancel_leaves_the_other_tenants_same_id_running(
    nats_server: NatsServer, sandbox: SandboxServer, bus: Bus
) -> None:
    ta, tb = await clients(nats_server, "ta", "tb")
    await sandbox.configure(latency_ms=1500)
    async with ta, tb, Events(bus.nc, "cy.events.*.x.>") as ev:
        run_a = asyncio.create_task(ta.run(two_steps("x", "alpha"), timeout=30))
        run_b = asyncio.create_task(tb.run(two_steps("x", "beta"), timeout=30))
        await wait_until(lambda: sandbox.counts["openai.chat"] >= 2, 10, "both first steps called")
        await ta.cancel("x", "changed my mind")
        a, b = await run_a, await run_b
    assert isinstance(a, ChainCancelled) and a.tenant == "ta"
    assert isinstance(b, ChainCompleted) and b.output.text == "echo: then echo: beta"
    failed = [e for s, e in ev.received if isinstance(e, StepFailed)]
    assert failed and all(e.tenant == "ta" and e.error.cls == "cancelled" for e in failed)
