"""Bad input at intake: a readable chain.rejected naming the path, the message kept in the DLQ, and
the router goes on serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import Events, kv_keys, running, stream_messages_eventually
from nats.errors import MaxPayloadError

from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainRejected,
    Config,
    Deployment,
    LlmStep,
    Message,
    ToolStep,
    encode,
)
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus, fits
from chainyard.stack import tool_workers
from chainyard.workers.llm import llm_executor
from chainyard.workers.providers.null import NullProvider
from chainyard.workers.runtime import Worker
from chainyard.workers.tools import Tools

TENANT = "acme"
tools = Tools()


@tools.tool
def search(query: str) -> list[str]:
    """Search."""
    return [query]


CONFIG = Config(
    deployments=[Deployment(name="null-a", pool="null", model="m", provider="null")],
    tools=["search"],
)


def good(cid: str) -> dict[str, Any]:
    return json.loads(
        encode(
            Chain(
                id=cid,
                steps=[
                    LlmStep(id="a", model="m", messages=[Message(role="user", content="hi")]),
                    ToolStep(id="b", tool="search", args={"query": "{{steps.a.output}}"}),
                ],
            )
        )
    )


def mutate(cid: str, fn: Any) -> bytes:
    raw = good(cid)
    fn(raw)
    return json.dumps(raw).encode()


# name -> (payload for chain id `bad-<name>`, expected error path, words the message must contain)
CASES: dict[str, tuple[bytes, str, list[str]]] = {
    "truncated-json": (b'{"id": "bad-truncated-json", "steps": [', "$", ["truncated"]),
    "malformed-json": (b'{"id": "bad-malformed-json",, "steps": []}', "$", ["JSON is malformed"]),
    "not-an-object": (b"[1, 2, 3]", "$", ["object", "array"]),
    "wrong-type": (
        mutate("bad-wrong-type", lambda r: r.update(priority="high")),
        "$.priority",
        ["int", "str"],
    ),
    "missing-field": (
        mutate("bad-missing-field", lambda r: r["steps"][0].pop("model")),
        "$.steps[0]",
        ["missing", "model"],
    ),
    "unknown-field": (
        mutate("bad-unknown-field", lambda r: r["steps"][1].update(colour="red")),
        "$.steps[1]",
        ["unknown field", "colour"],
    ),
    "bad-id": (
        mutate("bad-bad-id", lambda r: r["steps"][0].update(id="no spaces")),
        "$.steps[0].id",
        ["matching regex"],
    ),
    "unknown-model": (
        mutate("bad-unknown-model", lambda r: r["steps"][0].update(model="gpt-nonexistent")),
        "$.steps[0].model",
        ["gpt-nonexistent", "no deployment"],
    ),
    "unknown-tool": (
        mutate("bad-unknown-tool", lambda r: r["steps"][1].update(tool="teleport")),
        "$.steps[1].tool",
        ["teleport", "unknown tool"],
    ),
    "cycle": (
        mutate("bad-cycle", lambda r: r["steps"][0].update(after=["b"])),
        "$.steps",
        ["cycle", "a -> b"],
    ),
    "unknown-reference": (
        mutate(
            "bad-unknown-reference",
            lambda r: r["steps"][1]["args"].update(query="{{steps.ghost.output}}"),
        ),
        "$.steps[1]",
        ["ghost"],
    ),
}


@pytest.fixture
async def services(bus: Bus) -> AsyncIterator[None]:
    llm = Worker(bus, "null", llm_executor(NullProvider(), lambda t, u: 0.0), slots=8)
    async with running(Router(bus, CONFIG), llm, *tool_workers(bus, tools)):
        yield


async def publish(bus: Bus, data: bytes, msg_id: str) -> None:
    await bus.js.publish(bus.subjects.submit(TENANT), data, headers={"Nats-Msg-Id": msg_id})


async def assert_still_serving(bus: Bus, cid: str) -> None:
    async with Events(bus.nc, bus.subjects.chain_events(TENANT, cid)) as ev:
        await publish(bus, json.dumps(good(cid)).encode(), cid)
        ended = await ev.ended(cid)
    assert isinstance(ended, ChainCompleted), ended
    assert ended.output.data == ["ok"]


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_rejected_dead_lettered_and_router_keeps_serving(
    bus: Bus, services: None, case: str
) -> None:
    data, path, words = CASES[case]
    cid = f"bad-{case}"
    async with Events(bus.nc, bus.subjects.chain_events(TENANT, cid)) as ev:
        await publish(bus, data, cid)
        ended = await ev.ended(cid)
    assert isinstance(ended, ChainRejected), ended
    assert ended.tenant == TENANT
    paths = [e.path for e in ended.errors]
    assert path in paths, ended.errors
    text = " ".join(e.message for e in ended.errors if e.path == path)
    for w in words:
        assert w in text, f"{w!r} not in {text!r}"
    # nothing was created for a rejected chain
    assert await _no_state(bus, cid)
    # the offending message itself is kept in the DLQ, with the reason
    (dead,) = await stream_messages_eventually(
        bus.js, bus.topology.dlq.name, bus.subjects.dlq_subject("intake"), 1
    )
    assert dead.data == data
    assert dead.headers is not None and dead.headers["Cy-Tenant"] == TENANT
    assert words[0] in dead.headers["Cy-Reason"]
    await assert_still_serving(bus, f"after-{case}")


async def test_burst_of_bad_input_then_good_chain(bus: Bus, services: None) -> None:
    async with Events(bus.nc, bus.subjects.all_events) as ev:
        for case, (data, _, _) in CASES.items():
            await publish(bus, data, f"bad-{case}")
        for case in CASES:
            await ev.wait(
                lambda e, c=f"bad-{case}": isinstance(e, ChainRejected) and e.chain_id == c
            )
    dead = await stream_messages_eventually(
        bus.js, bus.topology.dlq.name, bus.subjects.dlq_subject("intake"), len(CASES)
    )
    assert sorted(m.data for m in dead) == sorted(d for d, _, _ in CASES.values())
    await assert_still_serving(bus, "after-burst")


async def test_unusable_message_id_still_gets_a_rejection(bus: Bus, services: None) -> None:
    """A message id that cannot be a chain id: the rejection goes out under a fresh id."""
    async with Events(bus.nc, f"cy.events.{TENANT}.*.chain.rejected") as ev:
        await publish(bus, b"not json at all", "has spaces and.dots")
        rejected = await ev.wait(lambda e: isinstance(e, ChainRejected))
    assert isinstance(rejected, ChainRejected)
    assert rejected.chain_id.startswith("rejected-")
    assert rejected.errors[0].path == "$"


async def test_same_id_different_chain_is_rejected(bus: Bus, services: None) -> None:
    cid = "taken"
    await assert_still_serving(bus, cid)
    other = good(cid)
    other["steps"][0]["messages"][0]["content"] = "something else"
    async with Events(bus.nc, bus.subjects.chain_events(TENANT, cid)) as ev:
        await publish(bus, json.dumps(other).encode(), "taken-2")
        rejected = await ev.wait(lambda e: isinstance(e, ChainRejected))
    assert isinstance(rejected, ChainRejected)
    assert rejected.errors[0].path == "$.id" and "already used" in rejected.errors[0].message


async def _no_state(bus: Bus, cid: str) -> bool:
    return f"{TENANT}.{cid}" not in await kv_keys(bus.js, bus.topology.chains_kv.bucket)


def test_a_publish_over_max_payload_with_its_headers_is_refused_before_the_server() -> None:
    """nats-py checks a payload alone; the server closes the connection of a message whose
    headers take it over the limit (a service whose connection closes exits): `fits` refuses it
    first, as the same MaxPayloadError."""
    headers = {"Nats-Msg-Id": "t.c.s.1"}
    fits(b"x" * 900, headers, 1000)  # 900 + 12 + 22: fits
    with pytest.raises(MaxPayloadError):
        fits(b"x" * 980, headers, 1000)  # the payload alone fits, not with its headers
    fits(b"x" * 10_000, headers, 0)  # 0: unchecked
