"""Tenant permissions (deploy/accounts.conf) with real NATS users, on nats-server started with
deploy/nats-secure.conf: tenant A does everything the README offers a tenant, through the
services, and every attempt on tenant B's chains, or on the system, is refused by the server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
from helpers import wait_until
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from test_security import Secure, secure  # noqa: F401 - `secure` is a fixture

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainCompleted,
    Config,
    StepCompleted,
    ToolStep,
    WaitStep,
    encode,
    state_decoder,
)
from chainyard.ordered import OrderedReader
from chainyard.runtime.nats import Bus, open_bus
from chainyard.stack import Services, build
from chainyard.workers.tools import Tools

tools = Tools()


@tools.tool
def weather(city: str) -> dict[str, object]:
    """Forecast for a city."""
    return {"city": city, "temp_c": 17 if city == "Lisbon" else 3}


def lisbon(cid: str) -> Chain:
    return Chain(id=cid, steps=[ToolStep(id="w", tool="weather", args={"city": "Lisbon"})])


def waiting(cid: str, signal: str = "go") -> Chain:
    """A chain that stays in flight until its signal comes (or it is cancelled)."""
    return Chain(
        id=cid,
        steps=[
            ToolStep(id="w", tool="weather", args={"city": "Oslo"}),
            WaitStep(id="ok", signal=signal, after=["w"]),
        ],
    )


@dataclass
class Stack:
    secure: Secure
    bus: Bus  # the services user


@pytest.fixture
async def stack(secure: Secure, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:  # noqa: F811
    """The router and a tool worker, connected as the services user."""
    monkeypatch.setenv("SSL_CERT_FILE", str(secure.dir / "ca.pem"))  # trust the test CA
    bus = await open_bus(secure.url("services"), name="services")
    services: Services = build(bus, Config(tools=["weather"]), tools=tools)
    services.start()
    try:
        yield Stack(secure, bus)
    finally:
        await services.shutdown()
        await bus.close()


async def tenant_client(s: Secure, name: str) -> Client:
    """The tenant's client as an application makes it (inbox prefix `_INBOX_<tenant>`)."""
    return await Client.connect(s.url(f"tenant-{name}"), name)


async def until_status(client: Client, want: list[str], timeout: float = 10.0) -> None:
    """Wait until `status()` lists exactly the chains `want`, each with its first step done
    (the waiting chains here are then at their wait step)."""

    async def listed() -> bool:
        rows = await client.status()
        return sorted(r.chain_id for r in rows) == sorted(want) and all(r.done for r in rows)

    await wait_until(listed, timeout, f"status() to list {want}")


async def test_tenant_does_everything_the_readme_offers(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="chainyard.nats")  # where a refusal would show
    a = await tenant_client(stack.secure, "A")
    try:
        # submit and wait (run): the end comes on A's own events
        first = await a.run(lisbon("t1"), timeout=30)
        assert isinstance(first, ChainCompleted), first
        assert first.output.data == {"city": "Lisbon", "temp_c": 17}
        # the same chain again is not run again: its end is found by a direct get by subject
        again = await a.run(lisbon("t1"), timeout=10)
        assert again == first
        # watch with history: the whole log of an ended chain
        log = [ev async for ev in a.watch("t1", history=True)]
        assert [type(ev) for ev in log] == [StepCompleted, ChainCompleted]
        # status, then signal: a chain waiting for a signal is listed until released
        await a.submit(waiting("t2"))
        await until_status(a, ["t2"])
        [row] = await a.status()
        assert (row.chain_id, row.steps, row.done, row.total) == ("t2", {"ok": "-"}, 1, 2)
        await a.signal("t2", "go", {"ok": True})
        ended = [ev async for ev in a.watch("t2", deltas=True)][-1]  # deltas: may subscribe
        assert isinstance(ended, ChainCompleted) and ended.output.data == {"ok": True}
        # cancel
        await a.submit(waiting("t3"))
        await until_status(a, ["t3"])
        await a.cancel("t3", "no longer needed")
        ended = [ev async for ev in a.watch("t3")][-1]
        assert isinstance(ended, ChainCancelled) and ended.reason == "no longer needed"
        # replay an ended chain as a new one, and wait for its end
        replayed = await a.replay("t1", "w", new_id="t1-r", wait=30)
        assert isinstance(replayed, ChainCompleted), replayed
        assert replayed.output.data == first.output.data
        await until_status(a, [])
    finally:
        await a.close()
    refusals = [r.getMessage() for r in caplog.records if "violation" in r.getMessage().lower()]
    assert refusals == []


# -- what a tenant must not do -------------------------------------------------------------------


class Refusals:
    """A user's raw connection (a tenant's, the gateway's) that records the server's permission
    errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.arrived = asyncio.Event()
        self.nc: NatsClient | None = None

    async def connect(self, s: Secure, user: str, inbox_prefix: str) -> NatsClient:
        async def on_error(e: Exception) -> None:
            self.errors.append(str(e).lower())
            self.arrived.set()

        self.nc = await nats.connect(
            s.url(user),
            tls=s.tls,
            inbox_prefix=inbox_prefix,
            error_cb=on_error,
            allow_reconnect=False,
        )
        return self.nc

    async def seen(self, text: str) -> None:
        async def wait() -> None:
            while not any(text.lower() in e for e in self.errors):
                self.arrived.clear()
                await self.arrived.wait()

        try:
            await asyncio.wait_for(wait(), 5)
        except TimeoutError:
            raise AssertionError(f"the server did not refuse: {text}") from None

    async def publish(self, subject: str, body: bytes = b"{}") -> None:
        """Publish (with a reply inbox, as a request does) and wait for the server's refusal."""
        assert self.nc is not None
        await self.nc.publish(subject, body, reply=self.nc.new_inbox())
        await self.seen(f'permissions violation for publish to "{subject}"')

    async def subscribe(self, subject: str) -> None:
        assert self.nc is not None
        sub = await self.nc.subscribe(subject)
        await self.seen(f'permissions violation for subscription to "{subject}"')
        await sub.unsubscribe()


def consumer_request(stream: str, filter_subject: str, name: str = "x") -> bytes:
    return json.dumps(
        {
            "stream_name": stream,
            "config": {
                "name": name,
                "filter_subject": filter_subject,
                "deliver_policy": "all",
                "ack_policy": "none",
            },
        }
    ).encode()


async def durables(js: JetStreamContext, stream: str) -> dict[str, str | None]:
    """The services' durable consumers on `stream`: name -> filter."""
    infos = await js.consumers_info(stream)
    return {i.name: i.config.filter_subject for i in infos if i.config.durable_name}


async def test_tenant_cannot_touch_another_tenants_chains(stack: Stack) -> None:
    s = stack.secure
    svc = stack.bus.js
    b = await tenant_client(s, "B")
    a = Refusals()
    nc = await a.connect(s, "tenant-A", "_INBOX_A")
    try:
        # B has an ended chain and one in flight
        done = await b.run(lisbon("b1"), timeout=30)
        assert isinstance(done, ChainCompleted)
        await b.submit(waiting("b2"))
        await until_status(b, ["b2"])
        engine_before = await durables(svc, "CY_EVENTS")
        assert "router-engine" in engine_before
        kv_before = await durables(svc, "KV_cy_chains")

        # submit as B, and cancel / signal / replay B's chains
        await a.publish("cy.submit.B", encode(lisbon("from-a")))
        await a.publish("cy.control.B.b2.cancel", b'{"reason": "a was here"}')
        await a.publish("cy.control.B.b2.signal.go", b'"from a"')
        await a.publish("cy.control.B.b1.replay", b'{"new_id": "a-r", "from_step": "w"}')
        await a.publish("cy.cancel.B.b2")  # the workers' broadcast
        # read B's events live, its deltas, its replies; anyone's inboxes, work, state, the API
        for subject in (
            "cy.events.B.>",
            "cy.events.B.b1.chain.completed",
            "cy.delta.B.>",
            "_INBOX_B.>",
            "_INBOX.>",
            "cy.events.>",
            "cy.work.>",
            "cy.cancel.>",
            "$KV.cy_chains.>",
            "$JS.>",
            ">",
        ):
            await a.subscribe(subject)
        # read B's events with history: a consumer on B's subjects, or on everything
        await a.publish(
            "$JS.API.CONSUMER.CREATE.CY_EVENTS.x.cy.events.B.>",
            consumer_request("CY_EVENTS", "cy.events.B.>"),
        )
        await a.publish(
            "$JS.API.CONSUMER.CREATE.CY_EVENTS.x.cy.events.>",
            consumer_request("CY_EVENTS", "cy.events.>"),
        )
        await a.publish("$JS.API.CONSUMER.CREATE.CY_EVENTS.x", consumer_request("CY_EVENTS", ""))
        await a.publish("$JS.API.CONSUMER.CREATE.CY_EVENTS", consumer_request("CY_EVENTS", ""))
        await a.publish("$JS.API.CONSUMER.DURABLE.CREATE.CY_EVENTS.x")
        # ... or with A's subject in the request subject and B's in the body: the server refuses
        reply = await nc.request(
            "$JS.API.CONSUMER.CREATE.CY_EVENTS.x.cy.events.A.>",
            consumer_request("CY_EVENTS", "cy.events.B.>"),
            timeout=5,
        )
        assert "did not match filtered subject" in json.loads(reply.data)["error"]["description"]
        # get B's events directly, by subject or by a request body
        await a.publish("$JS.API.DIRECT.GET.CY_EVENTS.cy.events.B.b1.chain.completed", b"")
        await a.publish("$JS.API.DIRECT.GET.CY_EVENTS", b'{"last_by_subj": "cy.events.B.>"}')
        await a.publish("$JS.API.STREAM.MSG.GET.CY_EVENTS", b'{"last_by_subj": "cy.events.B.>"}')
        # read or list B's chain state
        await a.publish(
            "$JS.API.CONSUMER.CREATE.KV_cy_chains.x.$KV.cy_chains.B.>",
            consumer_request("KV_cy_chains", "$KV.cy_chains.B.>"),
        )
        await a.publish(
            "$JS.API.CONSUMER.CREATE.KV_cy_chains.x.$KV.cy_chains.>",
            consumer_request("KV_cy_chains", "$KV.cy_chains.>"),
        )
        await a.publish("$JS.API.DIRECT.GET.KV_cy_chains.$KV.cy_chains.B.b2", b"")
        await a.publish("$JS.API.STREAM.MSG.GET.KV_cy_chains", b'{"last_by_subj": ">"}')
        await a.publish("$JS.API.STREAM.INFO.KV_cy_chains", b'{"subjects_filter": ">"}')
        await a.publish("$KV.cy_chains.B.b2", b"{}")
        # the gateway's API keys and limit counters: no tenant reads, adds or resets them
        for bucket in ("cy_keys", "cy_limits"):
            await a.subscribe(f"$KV.{bucket}.>")
            await a.publish(f"$JS.API.DIRECT.GET.KV_{bucket}", b'{"last_by_subj": ">"}')
            await a.publish(f"$JS.API.STREAM.MSG.GET.KV_{bucket}", b'{"last_by_subj": ">"}')
            await a.publish(
                f"$JS.API.CONSUMER.CREATE.KV_{bucket}.x.$KV.{bucket}.>",
                consumer_request(f"KV_{bucket}", f"$KV.{bucket}.>"),
            )
            await a.publish(f"$JS.API.STREAM.PURGE.KV_{bucket}")
        await a.publish("$KV.cy_keys.key_000000000000", b'{"tenant": "B"}')
        await a.publish("$KV.cy_limits.key_000000000000.rpm", b'{"window": 0}')
        # look around, delete, purge, ack others' messages, point a service's consumer at A
        for subject in (
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            "$JS.API.STREAM.LIST",
            "$JS.API.CONSUMER.NAMES.CY_EVENTS",
            "$JS.API.CONSUMER.INFO.CY_EVENTS.router-engine",
            "$JS.API.CONSUMER.MSG.NEXT.CY_EVENTS.router-engine",
            "$JS.API.CONSUMER.DELETE.CY_EVENTS.router-engine",
            "$JS.API.STREAM.DELETE.CY_EVENTS",
            "$JS.API.STREAM.PURGE.CY_EVENTS",
            "$JS.API.STREAM.PURGE.KV_cy_chains",
            "$JS.API.STREAM.MSG.DELETE.CY_EVENTS",
            "$JS.API.STREAM.UPDATE.CY_EVENTS",
            "$JS.ACK.CY_EVENTS.router-engine.1.1.1.1.0",
        ):
            await a.publish(subject)
        for stream, filter_subject in (
            ("CY_EVENTS", "cy.events.A.>"),
            ("KV_cy_chains", "$KV.cy_chains.A.>"),
        ):
            for name in {*engine_before, *kv_before}:  # every durable the services have
                await a.publish(
                    f"$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter_subject}",
                    consumer_request(stream, filter_subject, name),
                )

        # nothing of that changed B's chains or the services' consumers
        assert await durables(svc, "CY_EVENTS") == engine_before
        assert await durables(svc, "KV_cy_chains") == kv_before
        assert [r.chain_id for r in await b.status()] == ["b2"]
        await b.signal("b2", "go", "from b")
        ended = [ev async for ev in b.watch("b2")][-1]
        assert isinstance(ended, ChainCompleted) and ended.output.data == "from b"
        for key in ("B.from-a", "B.a-r"):
            with pytest.raises(Exception):  # noqa: B017 - KeyNotFoundError: never created
                await stack.bus.chains.get(key)
    finally:
        await nc.close()
        await b.close()


async def test_a_tenants_consumer_cannot_deliver_into_another_tenant(stack: Stack) -> None:
    """A tenant may create consumers on its own subjects, and the server does not check a push
    consumer's deliver subject against its creator's permissions (nats-server#8274). It delivers
    only while some subscription names that very subject (chainyard's services and clients
    subscribe with wildcards and random inboxes), and a delivered message keeps its own subject
    (A's), so nothing can pass for B's. Aimed at B's subjects, A's consumers deliver nowhere."""
    s = stack.secure
    a = await tenant_client(s, "A")
    b = await tenant_client(s, "B")
    try:
        assert isinstance(await a.run(lisbon("a1"), timeout=30), ChainCompleted)
        await b.submit(waiting("b3"))
        await until_status(b, ["b3"])
        targets = [
            "cy.submit.B",
            "cy.control.B.b3.cancel",
            "cy.cancel.B.b3",
            "cy.work.tools",
            "$KV.cy_chains.B.b3",
            "cy.events.B.b3.chain.completed",
        ]
        aimed = 0
        for stream, filter_subject in (
            ("CY_EVENTS", "cy.events.A.>"),
            ("KV_cy_chains", "$KV.cy_chains.A.>"),
        ):
            own = filter_subject.split(".A.")[0]  # the server refuses a stream's own subjects
            for i, target in enumerate(t for t in targets if not t.startswith(own)):
                await a.js.add_consumer(
                    stream,
                    ConsumerConfig(
                        name=f"aim-{i}-{stream.lower()}",
                        filter_subject=filter_subject,
                        deliver_subject=target,
                        ack_policy=AckPolicy.NONE,
                    ),
                )
                aimed += 1
        assert aimed == 10
        # A's history, then a new chain of A, would now go to those subjects, if anyone listened
        assert isinstance(await a.run(lisbon("a2"), timeout=30), ChainCompleted)
        # B's chain runs as if nothing happened: not cancelled, its state is its own
        assert [r.chain_id for r in await b.status()] == ["b3"]
        await b.signal("b3", "go", "fine")
        ended = [ev async for ev in b.watch("b3")][-1]
        assert isinstance(ended, ChainCompleted) and ended.output.data == "fine"
        state = state_decoder.decode((await stack.bus.chains.get("B.b3")).value)
        assert state.chain.id == "b3" and state.status == "completed"
        js = stack.bus.js
        info = await js.stream_info("CY_EVENTS", subjects_filter="cy.events.B.>")
        kinds = {subj.split(".", 4)[-1] for subj in info.state.subjects or {}}
        # nothing rejected; the one control B's chain got (its signal) was accepted
        assert kinds == {"step.completed", "control.accepted", "chain.completed"}, kinds
        # ... and no stream took in a delivery (the work queues are empty once all is acked)
        keys = (await js.stream_info("KV_cy_chains", subjects_filter=">")).state.subjects
        assert set(keys or {}) == {f"$KV.cy_chains.{k}" for k in ("A.a1", "A.a2", "B.b3")}
        for queue in ("CY_INTAKE", "CY_WORK"):  # (the last message is acked after its event)

            async def empty(queue: str = queue) -> bool:
                return (await js.stream_info(queue)).state.messages == 0

            await wait_until(empty, 10, f"{queue} to be empty")
    finally:
        await a.close()
        await b.close()


async def test_ordered_reader_starts_again_after_a_gap(stack: Stack) -> None:
    """A message lost between the server and the reader (a reconnect) is read again: the reader
    sees the consumer sequence jump and makes a new consumer after the last message passed on."""
    a = await tenant_client(stack.secure, "A")
    try:
        for i in range(3):
            assert isinstance(await a.run(lisbon(f"g{i}"), timeout=30), ChainCompleted)
        got: list[str] = []
        complete = asyncio.Event()

        async def keep(msg: Msg) -> None:
            got.append(msg.subject)
            if len(got) == 6:
                complete.set()

        reader = OrderedReader(a.nc, a.js, "CY_EVENTS", "cy.events.A.>", keep)
        dropped: list[int] = []
        on = reader._on  # drop the second message once, as a lost one would be

        async def lossy(msg: Msg) -> None:
            if msg.metadata.sequence.consumer == 2 and not dropped:
                dropped.append(msg.metadata.sequence.stream)
                return
            await on(msg)

        reader._on = lossy  # type: ignore[method-assign]
        try:
            await reader.start(DeliverPolicy.ALL)
            await asyncio.wait_for(complete.wait(), 10)
        finally:
            await reader.stop()
        assert dropped, "no message was dropped"
        kinds = ("step.completed", "chain.completed")
        assert got == [f"cy.events.A.g{i}.{k}" for i in range(3) for k in kinds]
    finally:
        await a.close()


async def test_status_and_history_work_for_an_operator(stack: Stack) -> None:
    """The services user (an operator, every permission) reads the same way."""
    op = Client(stack.bus.nc, "A")
    assert isinstance(await op.run(lisbon("op1"), timeout=30), ChainCompleted)
    assert [type(ev) async for ev in op.watch("op1")] == [StepCompleted, ChainCompleted]
    await op.submit(waiting("op2"))
    await until_status(op, ["op2"])
    await op.cancel("op2")
    assert isinstance([ev async for ev in op.watch("op2")][-1], ChainCancelled)
    await until_status(op, [])
