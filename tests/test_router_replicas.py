"""Two router replicas handle one chain's events: every interleaving the test can force.

No router loop runs here. The test is every other party: it hands the intake message and each
step event to the router it chooses, completes steps as the worker would, and holds compare-
and-sets at a gate so that two replicas read the same revision before either writes. The chain
has fan-out, a reference and fan-in (s1 -> s2 refers to s1; s3 beside them; s4 joins s2 and s3),
so a replica's cached state goes stale whenever the other one advanced the chain: before the fix
(DESIGN-NOTES #20) a current event then looked like a late duplicate and was acked as a no-op,
and the chain never ended.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import pull, wait_until

from chainyard.contracts import (
    Assignment,
    Chain,
    ChainCompleted,
    Config,
    Deployment,
    Heartbeat,
    LlmStep,
    Message,
    Output,
    PoolConfig,
    StepCompleted,
    Target,
    Usage,
    assignment_decoder,
    encode,
    event_decoder,
    now_ms,
)
from chainyard.ledger import read_stream
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer

TENANT = "acme"
POOL = "p"
CONFIG = Config(
    deployments=[Deployment(name="d", pool=POOL, model="m")],
    pools=[PoolConfig(name=POOL, base_url="http://127.0.0.1:9/v1", slots=64)],
)
TARGET = Target(deployment="d", pool=POOL, provider="openai", model="m")
DEPS = {"s1": [], "s2": ["s1"], "s3": [], "s4": ["s2", "s3"]}


def chain(chain_id: str) -> Chain:
    def ask(sid: str, text: str) -> LlmStep:
        return LlmStep(id=sid, model="m", messages=[Message(role="user", content=text)])

    return Chain(
        id=chain_id,
        steps=[
            ask("s1", "first"),
            ask("s2", "after {{steps.s1.output}}"),
            ask("s3", "beside"),
            ask("s4", "join {{steps.s2.output}} and {{steps.s3.output}}"),
        ],
        output="s4",
    )


def answer(a: Assignment) -> str:
    """A step's output: its id and the text it was sent, so references show in the result."""
    assert isinstance(a.step, LlmStep)
    return f"<{a.step_id}:{a.step.messages[0].content}>"


EXPECTED = "<s4:join <s2:after <s1:first>> and <s3:beside>>"

# A script: what happens after the chain is created, one item at a time; an item is the step
# events handed over together, each (step, router): ("s1", "A") alone, or two at once.
Item = tuple[tuple[str, str], ...]


def scripts() -> Iterator[tuple[Item, ...]]:
    """Every order in which steps can complete, each event handled by either replica, and every
    pair of steps running at the same time handled at once (both replicas, or one replica
    twice), with both reads made before either compare-and-set."""

    def walk(done: frozenset[str], prefix: tuple[Item, ...]) -> Iterator[tuple[Item, ...]]:
        ready = sorted(s for s, deps in DEPS.items() if s not in done and set(deps) <= done)
        if not ready:
            yield prefix
            return
        for s, r in itertools.product(ready, "AB"):
            yield from walk(done | {s}, (*prefix, ((s, r),)))
        for (s, t), (r, q) in itertools.product(itertools.combinations(ready, 2), ["AB", "BA"]):
            yield from walk(done | {s, t}, (*prefix, ((s, r), (t, q))))
        for s, t in itertools.combinations(ready, 2):
            yield from walk(done | {s, t}, (*prefix, ((s, "A"), (t, "A"))))

    yield from walk(frozenset(), ())


@dataclass
class Gate:
    """Holds compare-and-sets until `n` of them have read their revision."""

    n: int = 1
    waiting: int = 0
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def wrap(self, router: Router) -> None:
        update = router.store.update

        async def gated(key: str, state: Any, last: int) -> int:
            self.waiting += 1
            if self.waiting >= self.n:
                self.opened.set()
            await asyncio.wait_for(self.opened.wait(), 10)
            return await update(key, state, last)

        router.store.update = gated  # type: ignore[method-assign]

    def arm(self, n: int) -> None:
        self.n, self.waiting = n, 0
        self.opened = asyncio.Event()


class Harness:
    """Two routers on their own connections; the test's pull subscriptions stand in for their
    consume loops (intake, engine) and for the pool's workers."""

    def __init__(self, buses: dict[str, Bus], test_bus: Bus) -> None:
        self.bus = test_bus
        self.routers = {name: Router(bus, CONFIG) for name, bus in buses.items()}
        self.gate = Gate()
        for r in self.routers.values():
            self.gate.wrap(r)
        self.outputs: dict[tuple[str, str], str] = {}

    async def start(self) -> None:
        topo = self.bus.topology
        self.intake = await pull(self.bus, topo.intake, topo.intake_consumer)
        self.engine = await pull(self.bus, topo.events, topo.engine_consumer)
        self.work = await pull(self.bus, topo.work, topo.pool_consumer(POOL))
        hb = Heartbeat(
            pool=POOL, worker="w1", slots_total=64, slots_free=64, at_ms=now_ms(),
            interval_ms=600_000, models=["d"],
        )  # fmt: skip
        await self.bus.capacity.put(f"{POOL}.w1", encode(hb))
        for r in self.routers.values():
            await r.routing.start()
        await wait_until(
            lambda: all(r.capacity.has_workers(POOL) for r in self.routers.values()),
            10,
            "both routers see the pool's worker",
        )

    async def stop(self) -> None:
        for r in self.routers.values():
            await r.routing.stop()

    async def one(self, sub: Any) -> Any:
        msgs = await sub.fetch(1, timeout=5)
        assert len(msgs) == 1
        return msgs[0]

    async def assignments(self, n: int) -> list[Assignment]:
        """The next `n` assignments on the pool's queue, acked as a worker would."""
        got: list[Assignment] = []
        while len(got) < n:
            for m in await self.work.fetch(n - len(got), timeout=5):
                got.append(assignment_decoder.decode(m.data))
                await m.ack()
        return got

    async def complete(self, a: Assignment, copy: str = "") -> None:
        """Publish the step's result as a worker does (same subject and message id; a `copy`
        gets an id of its own, as a second worker's result of the same attempt would)."""
        out = answer(a)
        self.outputs[(a.chain_id, a.step_id)] = out
        ev = StepCompleted(
            chain_id=a.chain_id, step_id=a.step_id, attempt=a.attempt, tenant=a.tenant,
            output=Output(text=out), usage=Usage(input_tokens=1, output_tokens=1),
            target=a.target, worker="w1", dispatched_at_ms=a.dispatched_at_ms,
            started_at_ms=now_ms(), latency_ms=1.0,
        )  # fmt: skip
        subject = self.bus.subjects.event(a.tenant, a.chain_id, "step.completed")
        msg_id = f"{a.tenant}.{a.chain_id}.{a.step_id}.{a.attempt}.step.completed{copy}"
        await self.bus.js.publish(subject, encode(ev), headers={"Nats-Msg-Id": msg_id})

    async def run(self, chain_id: str, script: tuple[Item, ...]) -> list[str]:
        """Create the chain on replica A, then play the script; returns the steps assigned."""
        await self.bus.js.publish(self.bus.subjects.submit(TENANT), encode(chain(chain_id)))
        self.gate.arm(1)
        await self.routers["A"].on_submit(await self.one(self.intake))
        pending = {a.step_id: a for a in await self.assignments(2)}  # s1 and s3
        assigned = sorted(pending)
        for item in script:
            for step, _ in item:
                await self.complete(pending.pop(step))
            msgs = [await self.one(self.engine) for _ in item]
            by_step = {event_decoder.decode(m.data).step_id: m for m in msgs}  # type: ignore[union-attr]
            self.gate.arm(len(item))
            await asyncio.gather(*(self.routers[r].on_step_event(by_step[s]) for s, r in item))
            done = {s for it in script[: script.index(item) + 1] for s, _ in it}
            newly = [
                s for s, deps in DEPS.items()
                if s not in done and s not in pending and s not in assigned and set(deps) <= done
            ]  # fmt: skip
            for a in await self.assignments(len(newly)):
                pending[a.step_id] = a
                assigned.append(a.step_id)
        return assigned


@pytest.fixture
async def harness(nats_server: NatsServer) -> AsyncIterator[Harness]:
    buses = {n: await open_bus(nats_server.url, name=f"router-{n}") for n in "AB"}
    test_bus = await open_bus(nats_server.url, name="test")
    h = Harness(buses, test_bus)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()
        for b in [*buses.values(), test_bus]:
            await b.close()


def test_the_scripts_cover_the_interleavings() -> None:
    all_ = list(scripts())
    # the shape that lost chains: A created the chain, B recorded s1 (and dispatched s2), then
    # A, whose cached copy still shows s2 pending, gets s2's result
    assert any(s[:2] == ((("s1", "B"),), (("s2", "A"),)) for s in all_)
    # both replicas deciding on one revision at once, and one replica twice at once
    pairs = [item for s in all_ for item in s if len(item) == 2]
    assert {tuple(r for _, r in item) for item in pairs} == {("A", "B"), ("B", "A"), ("A", "A")}


async def test_two_replicas_every_interleaving_ends_each_chain_once(harness: Harness) -> None:
    """Each script on its own chain: all four steps assigned exactly once, references resolved,
    the chain completed exactly once with the output its steps produced, and no work left."""
    all_ = list(scripts())
    for i, script in enumerate(all_):
        cid = f"c{i:04d}"
        assigned = await harness.run(cid, script)
        assert sorted(assigned) == ["s1", "s2", "s3", "s4"], (script, assigned)
        ends = await completed_events(harness.bus, cid)
        assert len(ends) == 1, (script, ends)
        assert isinstance(ends[0], ChainCompleted) and ends[0].output.text == EXPECTED, script
    # nothing left anywhere: no event unhandled, no assignment sent twice
    topo = harness.bus.topology
    engine = await harness.bus.js.consumer_info(topo.events.name, topo.engine_consumer.durable)
    work = await harness.bus.js.stream_info(topo.work.name)
    assert (engine.num_pending, engine.num_ack_pending, work.state.messages) == (0, 0, 0)


async def test_a_late_duplicate_on_a_stale_replica_changes_nothing(harness: Harness) -> None:
    """The other side of the fix: a result that really is a duplicate, handed to the replica
    whose copy is stale, is still recognised after its fresh read (no second dispatch, no
    second end)."""
    script = ((("s1", "A"),), (("s3", "A"),), (("s2", "B"),), (("s4", "B"),))
    await harness.run("dup", script)
    h = harness
    # a late copy of s2's result (a zombie worker's), to A, which last saw the chain before s2
    # completed
    a2 = Assignment(
        chain_id="dup", step_id="s2", attempt=1, tenant=TENANT, step=chain("dup").steps[1],
        target=TARGET, dispatched_at_ms=now_ms(),
    )  # fmt: skip
    await h.complete(a2, copy="-late")
    h.gate.arm(1)
    await h.routers["A"].on_step_event(await h.one(h.engine))
    assert len(await completed_events(h.bus, "dup")) == 1
    work = await h.bus.js.stream_info(h.bus.topology.work.name)
    assert work.state.messages == 0


async def completed_events(bus: Bus, chain_id: str) -> list[Any]:
    """The chain's terminal events stored in CY_EVENTS."""
    subject = bus.subjects.event(TENANT, chain_id, "chain.*")
    msgs = await read_stream(bus.js, bus.topology.events.name, subject)
    return [event_decoder.decode(m.data) for m in msgs]
