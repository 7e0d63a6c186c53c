"""`chainyard gateway` with the official `anthropic` SDK (Messages, streaming, tool use, errors)
and chainyard's own chain API over HTTP (submit, SSE events, state, cancel, signal), tenant
scoped, over the live deployment of tests/gateway_stack.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import anthropic
import httpx
import pytest
import pytest_asyncio
from gateway_stack import KEYS, PROVIDER_KEY, Stack, live_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with live_stack(tmp_path_factory.mktemp("gw"), gateways=1) as s:
        yield s
        assert PROVIDER_KEY not in s.logs_text()


def claude(live: Stack, key: str = KEYS["acme"]) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=live.url, api_key=key, max_retries=0)


def auth(key: str = KEYS["acme"]) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_anthropic_sdk_plain(live: Stack) -> None:
    async with claude(live) as client:
        msg = await client.messages.create(
            model="small",
            max_tokens=32,
            system="be brief",
            messages=[{"role": "user", "content": "hello claude"}],
        )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == "echo: hello claude"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 3


async def test_anthropic_sdk_streaming(live: Stack) -> None:
    async with claude(live) as client:
        async with client.messages.stream(
            model="gpt-4o-mini",
            max_tokens=64,
            messages=[{"role": "user", "content": "stream me some words"}],
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert text == "echo: stream me some words"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
    assert final.usage.input_tokens == 4


async def test_anthropic_sdk_raw_event_types(live: Stack) -> None:
    async with claude(live) as client:
        stream = await client.messages.create(
            model="gpt-4o-mini",
            max_tokens=64,
            messages=[{"role": "user", "content": "events please"}],
            stream=True,
        )
        kinds = [ev.type async for ev in stream]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert "content_block_delta" in kinds
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_anthropic_sdk_tool_use_round_trip(live: Stack) -> None:
    tool = {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    ask = {"role": "user", "content": 'call get_weather {"city": "Lima"}'}
    async with claude(live) as client:
        first = await client.messages.create(
            model="gpt-4o-mini",
            max_tokens=64,
            tools=[tool],  # type: ignore[list-item]
            messages=[ask],  # type: ignore[list-item]
        )
        assert first.stop_reason == "tool_use"
        use = next(b for b in first.content if b.type == "tool_use")
        assert use.name == "get_weather" and use.input == {"city": "Lima"}
        second = await client.messages.create(
            model="gpt-4o-mini",
            max_tokens=64,
            tools=[tool],  # type: ignore[list-item]
            messages=[
                ask,  # type: ignore[list-item]
                {"role": "assistant", "content": [b.model_dump() for b in first.content]},  # type: ignore[misc]
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "warm"}],
                },
            ],
        )
    assert second.content[0].text == "echo: warm"  # type: ignore[union-attr]


async def test_anthropic_tool_choice_reaches_the_provider(live: Stack) -> None:
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    async with claude(live) as client:
        for choice, sent in (
            ({"type": "any"}, "required"),
            (
                {"type": "tool", "name": "get_weather"},
                {"type": "function", "function": {"name": "get_weather"}},
            ),
        ):
            await client.messages.create(
                model="primary-mini",
                max_tokens=16,
                tools=[tool],  # type: ignore[list-item]
                tool_choice=choice,  # type: ignore[arg-type]
                messages=[{"role": "user", "content": "weather?"}],
            )
            assert live.sandboxes["primary"].last("openai.chat").body["tool_choice"] == sent


async def test_anthropic_errors_in_anthropic_shape(live: Stack) -> None:
    async with claude(live) as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(
                model="claude-9", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model="small", max_tokens=8, messages=[])
    async with httpx.AsyncClient(timeout=30) as http:  # (the SDK will not send it without)
        no_max = await http.post(
            f"{live.v1()}/messages",
            headers={"x-api-key": KEYS["acme"]},
            json={"model": "small", "messages": [{"role": "user", "content": "x"}]},
        )
    assert no_max.status_code == 400
    error = no_max.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("max_tokens: Object missing required field")
    async with claude(live, key="sk-nope") as client:
        with pytest.raises(anthropic.AuthenticationError) as denied:
            await client.messages.create(
                model="small", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        assert denied.value.body == {  # type: ignore[comparison-overlap]
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid API key"},
        }


# -- chainyard's chain API over HTTP ---------------------------------------------------------

CHAIN = {
    "steps": [
        {"kind": "llm", "id": "plan", "model": "small",
         "messages": [{"role": "user", "content": "plan a day"}]},
        {"kind": "llm", "id": "answer", "model": "small",
         "messages": [{"role": "user", "content": "answer {{steps.plan.output}}"}]},
    ]
}  # fmt: skip


async def test_chain_without_id_gets_one_and_answers_with_its_end(live: Stack) -> None:
    async with httpx.AsyncClient(base_url=live.v1(), timeout=30) as http:
        r = await http.post("/chains", headers=auth(), json=CHAIN)
        assert r.status_code == 200, r.text
        ended = r.json()
        assert ended["type"] == "chain.completed"
        assert ended["output"]["text"] == "echo: answer echo: plan a day"
        chain_id = r.headers["x-chainyard-chain-id"]
        assert ended["chain_id"] == chain_id
        state = (await http.get(f"/chains/{chain_id}", headers=auth())).json()
        assert state["status"] == "completed" and state["tenant"] == "acme"
        # another tenant does not see it, under the same id
        other = await http.get(f"/chains/{chain_id}", headers=auth(KEYS["globex"]))
        assert other.status_code == 404
        assert other.json()["error"]["code"] == "not_found"
        hidden = await http.get(f"/chains/{chain_id}/events", headers=auth(KEYS["globex"]))
        assert hidden.status_code == 404
        lines = (await http.get(f"/chains/{chain_id}/events", headers=auth())).text.splitlines()
        kinds = [json.loads(x)["type"] for x in lines]
        assert kinds == ["step.completed", "step.completed", "chain.completed"]


async def test_bad_chains_are_rejected_with_their_paths(live: Stack) -> None:
    async with httpx.AsyncClient(base_url=live.v1(), timeout=30) as http:
        bad = {"deadline_ms": "soon", "steps": [{"kind": "llm", "id": "a", "model": "gpt-9"}]}
        r = await http.post("/chains", headers=auth(), json=bad)
        assert r.status_code == 400
        ended = r.json()
        assert ended["type"] == "chain.rejected" and ended["errors"][0]["path"].startswith("$")
        broken = await http.post("/chains", headers=auth(), content=b'{"steps": [')
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


async def test_same_chain_id_in_two_tenants(live: Stack) -> None:
    async with httpx.AsyncClient(base_url=live.v1(), timeout=30) as http:
        chain = {"id": "shared-id", "steps": [CHAIN["steps"][0]]}
        a, g = await asyncio.gather(
            http.post("/chains", headers=auth(), json=chain),
            http.post("/chains", headers=auth(KEYS["globex"]), json=chain),
        )
    assert a.json()["tenant"] == "acme" and g.json()["tenant"] == "globex"
    assert a.json()["type"] == g.json()["type"] == "chain.completed"


async def test_chain_events_as_sse(live: Stack) -> None:
    events: list[tuple[str, dict[str, object]]] = []
    async with httpx.AsyncClient(base_url=live.v1(), timeout=30) as http:
        async with http.stream(
            "POST", "/chains", headers={**auth(), "accept": "text/event-stream"}, json=CHAIN
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            kind = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line.removeprefix("data: "))))
    assert [k for k, _ in events] == ["step.completed", "step.completed", "chain.completed"]
    assert all(k == e["type"] for k, e in events)


async def test_events_with_streamed_deltas(live: Stack) -> None:
    streamed = {
        "steps": [
            {"kind": "llm", "id": "talk", "model": "small", "params": {"stream": True},
             "messages": [{"role": "user", "content": "four words come back"}]}
        ]
    }  # fmt: skip
    # the first token after 500 ms: the events request is in place before any delta
    await live.sandboxes["primary"].configure(latency_ms=500.0, chunk_delay_ms=50.0)
    try:
        async with httpx.AsyncClient(base_url=live.v1(), timeout=30) as http:
            chain_id = (
                await http.post("/chains?wait=false", headers=auth(), json=streamed)
            ).json()["id"]
            kinds, text = [], ""
            async with http.stream(
                "GET",
                f"/chains/{chain_id}/events?deltas=true",
                headers={**auth(), "accept": "text/event-stream"},
            ) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        ev = json.loads(line.removeprefix("data: "))
                        kinds.append(ev["type"])
                        text += ev.get("text", "") if ev["type"] == "delta" else ""
    finally:
        await live.sandboxes["primary"].configure(latency_ms=0.0, chunk_delay_ms=0.0)
    assert kinds[-2:] == ["step.completed", "chain.completed"]
    assert "delta" in kinds and text == "echo: four words come back"


async def test_signal_and_cancel_over_http(live: Stack) -> None:
    waiting = {"steps": [{"kind": "wait", "id": "approval", "signal": "approve"}]}
    async with httpx.AsyncClient(base_url=live.v1(), timeout=30) as http:
        first = await http.post("/chains?wait=false", headers=auth(), json=waiting)
        assert first.status_code == 202
        released = first.json()["id"]
        answer = await http.post(
            f"/chains/{released}/signal/approve", headers=auth(), json={"ok": True}
        )
        assert answer.status_code == 200 and answer.json()["type"] == "control.accepted"
        second = await http.post("/chains?wait=false", headers=auth(), json=waiting)
        doomed = second.json()["id"]
        stranger = await http.post(f"/chains/{doomed}/cancel", headers=auth(KEYS["globex"]))
        assert stranger.status_code == 409  # globex has no such chain
        cancelled = await http.post(
            f"/chains/{doomed}/cancel", headers=auth(), json={"reason": "changed my mind"}
        )
        assert cancelled.status_code == 200
        again = await http.post(f"/chains/{doomed}/cancel", headers=auth())
        assert again.status_code == 409 and "already ended" in again.json()["message"]
        bad = await http.post("/chains/a.b/cancel", headers=auth())
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "chain_id"
        for cid, end in ((released, "completed"), (doomed, "cancelled")):
            state = (await http.get(f"/chains/{cid}", headers=auth())).json()
            assert state["status"] == end
