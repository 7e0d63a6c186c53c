"""`POST /v1/responses` (OpenAI's Responses API) with the official `openai` SDK, unchanged but
for base_url and key, over a live deployment (tests/gateway_stack.py): two gateway and two
router processes, a worker process per pool, sandbox providers. Answers and stream events are
checked against OpenAI's OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from agents import Agent, OpenAIResponsesModel, RunConfig, Runner, function_tool
from gateway_stack import KEYS, Stack, hang_up_mid_stream, slow_chunks
from helpers import wait_until
from test_gateway_openai import WEATHER as CHAT_WEATHER
from test_gateway_openai import auth, live, needs_spec, request_properties, sdk, step_events
from test_sandbox_openapi import validate

from chainyard.contracts import StepCompleted
from chainyard.gateway import responses as gateway_responses

__all__ = ["live"]  # the live deployment, as the chat tests have it (one per module)
pytestmark = pytest.mark.asyncio(loop_scope="module")


def ask(text: str, **kw: object) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "input": text, **kw}


def chain_of(response_id: str) -> str:
    assert response_id.startswith("resp_"), response_id
    return response_id.removeprefix("resp_")


async def sse(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """The events of a streamed answer; each one's `event:` name is checked against its type."""
    events: list[dict[str, Any]] = []
    name = None
    async with http.stream("POST", "responses", headers=headers or auth(), json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                assert event["type"] == name, (name, event)
                events.append(event)
        return r, events


# The schema of each stream event, by its `type`
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
}


def check_events(events: list[dict[str, Any]]) -> None:
    """Each event in its schema, numbered from 0 in order."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        validate(e, EVENT_SCHEMAS[e["type"]])


@needs_spec
async def test_every_accepted_argument_is_one_openai_knows() -> None:
    known = request_properties("CreateResponse")
    assert "input" in known and "frobnicate" not in known
    assert gateway_responses.KNOWN <= known, gateway_responses.KNOWN - known
    assert set(gateway_responses.REFUSED) <= known


@needs_spec
async def test_plain_response_in_openai_shape(live: Stack) -> None:
    body = ask("hello there", instructions="be brief", max_output_tokens=64, store=True)
    validate(body, "CreateResponse")
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{live.v1()}/responses", headers=auth(), json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    validate(got, "Response")
    assert got["id"] == f"resp_{r.headers['x-chainyard-chain-id']}"
    assert got["object"] == "response" and got["status"] == "completed"
    assert got["store"] is False and got["instructions"] == "be brief"
    [message] = got["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["text"] == "echo: hello there"
    usage = got["usage"]
    assert usage["output_tokens"] == 3 and usage["input_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + 3
    sent = live.sandboxes["primary"].last("openai.chat").body
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["max_tokens"] == 64


async def test_sdk_output_text_headers_and_metadata(live: Stack) -> None:
    """Developer messages and `instructions` are system messages; text parts are joined."""
    parts = [{"type": "input_text", "text": "two "}, {"type": "input_text", "text": "words"}]
    said = [{"role": "developer", "content": "no emojis"}, {"role": "user", "content": parts}]
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with sdk(live) as client:
        raw = await client.responses.with_raw_response.create(
            model="small",
            instructions="answer in kind",
            input=said,  # type: ignore[arg-type]
            temperature=0,
            top_p=0.5,
            user="u-42",
            metadata={"team": "bi"},
            extra_headers={"traceparent": trace},
        )
    done = raw.parse()
    assert done.output_text == "echo: two words"
    assert done.temperature == 0 and done.top_p == 0.5 and done.metadata == {"team": "bi"}
    chain_id = raw.headers["x-chainyard-chain-id"]
    assert chain_id.startswith("resp-") and done.id == f"resp_{chain_id}"
    assert raw.headers["x-chainyard-trace-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = live.sandboxes["primary"].last("openai.chat").body
    assert [m["role"] for m in sent["messages"]] == ["system", "system", "user"]
    assert sent["temperature"] == 0
    async with httpx.AsyncClient(timeout=30) as http:
        state = (await http.get(f"{live.v1()}/chains/{chain_id}", headers=auth())).json()
    assert state["chain"]["metadata"] == {"team": "bi", "user": "u-42"}


async def test_tenants_keep_their_own_responses(live: Stack) -> None:
    """Two tenants with the same Idempotency-Key get chains of their own, and neither key
    reads the other's chain."""
    headers = {"Idempotency-Key": "shared-key-1"}
    async with sdk(live, KEYS["acme"]) as acme, sdk(live, KEYS["globex"], i=1) as globex:
        a, g = await asyncio.gather(
            acme.responses.create(**ask("for acme"), extra_headers=headers),
            globex.responses.create(**ask("for globex"), extra_headers=headers),
        )
    assert (a.output_text, g.output_text) == ("echo: for acme", "echo: for globex")
    assert a.id != g.id
    async with httpx.AsyncClient(timeout=30) as http:
        mine = await http.get(f"{live.v1()}/chains/{chain_of(g.id)}", headers=auth("sk-globex"))
        theirs = await http.get(f"{live.v1()}/chains/{chain_of(g.id)}", headers=auth())
    assert mine.status_code == 200 and theirs.status_code == 404


@needs_spec
async def test_stream_events_in_openai_shape(live: Stack) -> None:
    async with httpx.AsyncClient(base_url=live.v1() + "/", timeout=30) as http:
        r, events = await sse(http, ask("one two three four five", stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    check_events(events)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 2  # the sandbox streams a word a chunk
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "echo: one two three four five"
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] == 6
    assert {e["response"]["id"] for e in events if "response" in e} == {
        f"resp_{r.headers['x-chainyard-chain-id']}"
    }


async def test_sdk_stream_helper_and_create_stream(live: Stack) -> None:
    async with sdk(live) as client:
        async with client.responses.stream(
            model="gpt-4o-mini", input="stream this please", instructions="be brief"
        ) as stream:
            parts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        events = await client.responses.create(**ask("and this one"), stream=True)
        texts, done = [], None
        async for event in events:
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
            elif event.type == "response.completed":
                done = event.response
    assert "".join(parts) == final.output_text == "echo: stream this please"
    assert final.usage is not None and final.usage.output_tokens == 4
    assert "".join(texts) == "echo: and this one"
    assert done is not None and done.output_text == "echo: and this one"
    assert done.usage is not None and done.usage.total_tokens > done.usage.output_tokens == 4


WEATHER = {"type": "function", **CHAT_WEATHER["function"], "strict": False}
CALL = 'call get_weather {"city": "Paris"}'


@needs_spec
async def test_sdk_function_tool_round_trip(live: Stack) -> None:
    async with sdk(live) as client:
        raw = await client.responses.with_raw_response.create(
            **ask(CALL),
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="auto",
        )
        first = raw.parse()
        validate(json.loads(raw.text), "Response")
        [call] = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        assert first.output_text == ""  # only the call, no message
        second = await client.responses.create(
            model="gpt-4o-mini",
            input=[
                {"role": "user", "content": CALL},
                *[item.model_dump(exclude_none=True) for item in first.output],  # type: ignore[misc]
                {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
            ],
            tools=[WEATHER],  # type: ignore[list-item]
        )
    assert second.output_text == "echo: sunny, 21 C"
    sent = live.sandboxes["primary"].last("openai.chat").body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["tool_calls"][0]["id"] == sent[2]["tool_call_id"] == call.call_id


async def test_tool_choice_reaches_the_provider(live: Stack) -> None:
    named = {"type": "function", "name": "get_weather"}
    async with sdk(live) as client:
        for choice, sent in (
            ("required", "required"),
            (named, {"type": "function", "function": {"name": "get_weather"}}),
            ("none", "none"),
        ):
            await client.responses.create(
                model="primary-mini",
                input="weather?",
                tools=[WEATHER],  # type: ignore[list-item]
                tool_choice=choice,  # type: ignore[arg-type]
            )
            assert live.sandboxes["primary"].last("openai.chat").body["tool_choice"] == sent


@needs_spec
async def test_streamed_function_call(live: Stack) -> None:
    async with httpx.AsyncClient(base_url=live.v1() + "/", timeout=30) as http:
        _, events = await sse(http, ask(CALL, tools=[WEATHER], stream=True))
    check_events(events)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[4]
    assert done["name"] == "get_weather" and json.loads(done["arguments"]) == {"city": "Paris"}
    [item] = events[-1]["response"]["output"]
    assert item["type"] == "function_call" and item["arguments"] == done["arguments"]
    async with sdk(live) as client:
        async with client.responses.stream(
            **ask(CALL),
            tools=[WEATHER],  # type: ignore[list-item]
        ) as stream:
            final = await stream.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


@function_tool
def get_weather(city: str) -> str:
    """Weather for a city."""
    return f"sunny in {city}"


async def test_openai_agents_sdk_runs_its_tool_loop(live: Stack) -> None:
    """The OpenAI Agents SDK calls the Responses API: unchanged but for its client, an agent
    calls its function tool and answers from the result, run and streamed."""
    async with sdk(live) as client:
        agent = Agent(
            name="weather",
            instructions="Use the tool.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client),
        )
        quiet = RunConfig(tracing_disabled=True)  # (its traces would go to OpenAI)
        ran = await Runner.run(agent, CALL, run_config=quiet)
        streamed = Runner.run_streamed(agent, CALL.replace("Paris", "Oslo"), run_config=quiet)
        kinds = {event.type async for event in streamed.stream_events()}
    assert ran.final_output == "echo: sunny in Paris"
    assert streamed.final_output == "echo: sunny in Oslo" and "raw_response_event" in kinds
    sent = live.sandboxes["primary"].last("openai.chat").body["messages"]
    assert sent[0] == {"role": "system", "content": "Use the tool."}
    assert [m["role"] for m in sent[1:]] == ["user", "assistant", "tool"]


@needs_spec
async def test_json_schema_output(live: Stack) -> None:
    fmt = {
        "type": "json_schema",
        "name": "person",
        "schema": {"type": "object", "required": ["name", "age"], "additionalProperties": False}
        | {"properties": {"name": {"type": "string"}, "age": {"type": "integer"}}},
        "strict": True,
    }
    async with sdk(live) as client:
        raw = await client.responses.with_raw_response.create(
            **ask("a person please"),
            text={"format": fmt},  # type: ignore[typeddict-item]
        )
        plain = await client.responses.create(
            **ask("any json"),
            text={"format": {"type": "json_object"}},
        )
    done = raw.parse()
    validate(json.loads(raw.text), "Response")
    person = json.loads(done.output_text)
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    assert done.text is not None and done.text.format.type == "json_schema"
    assert isinstance(json.loads(plain.output_text), dict)
    sent = live.sandboxes["primary"].last("openai.chat").body
    assert sent["response_format"]["type"] == "json_object"


@needs_spec
async def test_max_output_tokens_makes_an_incomplete_response(live: Stack) -> None:
    words = " ".join(f"w{i}" for i in range(30))
    async with httpx.AsyncClient(base_url=live.v1() + "/", timeout=30) as http:
        r = await http.post("responses", headers=auth(), json=ask(words, max_output_tokens=16))
        _, events = await sse(http, ask(words, max_output_tokens=16, stream=True))
    got = r.json()
    validate(got, "Response")
    assert got["status"] == "incomplete"
    assert got["incomplete_details"] == {"reason": "max_output_tokens"}
    assert len(got["output"][0]["content"][0]["text"].split()) == 16
    check_events(events)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_refusals_name_the_parameter(live: Stack) -> None:
    async with sdk(live) as client:
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.responses.create(model="gpt-9", input="hi")
        with pytest.raises(openai.BadRequestError) as previous:
            await client.responses.create(**ask("again"), previous_response_id="resp_abc")
        with pytest.raises(openai.PermissionDeniedError) as narrow:
            async with sdk(live, KEYS["narrow"]) as other:
                await other.responses.create(**ask("x"))
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    assert previous.value.param == "previous_response_id"
    assert "send the whole conversation in `input`" in previous.value.message
    assert narrow.value.param == "model"
    cases = [
        ({"conversation": "conv_1"}, "conversation", "stores no conversations"),
        ({"background": True}, "background", "POST /v1/chains"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "instructions"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
        ({"tool_choice": {"type": "file_search"}, "tools": [WEATHER]},
         "tool_choice", "OpenAI hosts"),
        ({"input": [{"role": "user", "content": "a"}, {"role": "tool"}]}, "input[1].role", ""),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input[0].call_id", ""),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "send the item"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
         "input[0].content[0]", "only text"),
        ({"input": []}, "input", "at least one"),
        ({"input": 7}, "input", ""),
        ({"text": {"format": {"type": "xml"}}}, "text.format", "unsupported"),
        ({"max_output_tokens": "many"}, "max_output_tokens", ""),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized"),
    ]  # fmt: skip
    async with httpx.AsyncClient(timeout=30) as http:
        for extra, param, words in cases:
            r = await http.post(f"{live.v1()}/responses", headers=auth(), json=ask("x") | extra)
            assert r.status_code == 400, (extra, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["param"] == param and words in err["message"], (extra, err)
        missing = await http.post(f"{live.v1()}/responses", headers=auth(), json={"model": "m"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "input"
        keyless = await http.post(f"{live.v1()}/responses", json=ask("x"))
        assert keyless.status_code == 401
        stored = await http.get(f"{live.v1()}/responses/resp_chat-1", headers=auth())
        assert stored.status_code == 404 and "GET /v1/chains/chat-1" in stored.text
        items = await http.get(f"{live.v1()}/responses/resp_x/input_items", headers=auth())
        assert items.status_code == 404 and "stores no responses" in items.text
        r = await http.post(f"{live.v1()}/responses", headers=auth(), json=ask("still fine"))
        assert r.json()["output"][0]["content"][0]["text"] == "echo: still fine"


async def test_idempotency_key_across_two_gateway_replicas_runs_once(live: Stack) -> None:
    calls_before = live.sandboxes["primary"].counts["openai.chat"]
    headers = {"Idempotency-Key": "resp-order-7731"}
    async with sdk(live, i=0) as a, sdk(live, i=1) as b:
        answers = await asyncio.gather(
            a.responses.create(**ask("charge once"), extra_headers=headers),
            b.responses.create(**ask("charge once"), extra_headers=headers),
        )
        first = int(answers[0].created_at)
        await wait_until(lambda: int(time.time()) > first, 5, "the clock's next second")
        again = await b.responses.create(**ask("charge once"), extra_headers=headers)
        with pytest.raises(openai.ConflictError):
            await a.responses.create(**ask("charge twice"), extra_headers=headers)
    done = (*answers, again)
    assert len({r.id for r in done}) == 1 and done[0].id.startswith("resp_idem-")
    assert {r.output_text for r in done} == {"echo: charge once"}
    assert {r.created_at for r in done} == {first}
    events = await step_events(live, chain_of(done[0].id))
    assert sum(isinstance(e, StepCompleted) for e in events) == 1
    assert live.sandboxes["primary"].counts["openai.chat"] == calls_before + 1


async def test_streamed_retry_with_idempotency_key_replays_the_first_answer(live: Stack) -> None:
    headers = {"Idempotency-Key": "resp-stream-retry-1"}

    async def streamed(i: int) -> openai.types.responses.Response:
        async with sdk(live, i=i) as client:
            async with client.responses.stream(**ask("say it once"), extra_headers=headers) as s:
                return await s.get_final_response()

    first = await streamed(0)
    # the retry goes to the other replica, a second later, and still says the first's time
    await wait_until(lambda: int(time.time()) > int(first.created_at), 5, "the next second")
    again = await streamed(1)
    assert first.output_text == again.output_text == "echo: say it once"
    assert first.id == again.id and first.created_at == again.created_at
    events = await step_events(live, chain_of(first.id))
    assert sum(isinstance(e, StepCompleted) for e in events) == 1


async def test_routing_headers_and_deadline(live: Stack) -> None:
    async with sdk(live) as client:
        avoided = await client.responses.create(
            **ask("not on primary"), extra_headers={"x-chainyard-avoid": "primary"}
        )
        with pytest.raises(openai.BadRequestError) as bad:
            await client.responses.create(
                **ask("x"), extra_headers={"x-chainyard-strategy": "random"}
            )
        with pytest.raises(openai.APIStatusError) as late:
            await client.responses.create(
                model="slow-model", input="wait", extra_headers={"x-chainyard-deadline-ms": "500"}
            )
    events = await step_events(live, chain_of(avoided.id))
    assert {e.target.pool for e in events if isinstance(e, StepCompleted)} == {"backup"}
    assert bad.value.param == "x-chainyard-strategy"
    assert late.value.status_code == 504 and "deadline" in late.value.message


@needs_spec
async def test_failure_mid_stream_is_an_error_then_response_failed(live: Stack) -> None:
    """Past the deadline after some text was streamed: the stream says so in its own events
    (the HTTP status went out with the first event)."""
    deadline = {"x-chainyard-deadline-ms": "1500"}
    words = "a b c d e f g h i j k l m n o p"
    slow = slow_chunks(live, "flaky")  # (a pool of its own: these failures may open its breaker)
    async with slow, httpx.AsyncClient(base_url=live.v1() + "/", timeout=30) as http:
        body = ask(words, model="flaky-ha", stream=True)
        r, events = await sse(http, body, {**auth(), **deadline})
    assert r.status_code == 200
    check_events(events)
    kinds = [e["type"] for e in events]
    assert "response.output_text.delta" in kinds
    assert kinds[-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "deadline_exceeded"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    async with slow_chunks(live, "flaky"), sdk(live) as client:  # the SDK: no completion
        async with client.responses.stream(
            model="flaky-ha", input=words, extra_headers=deadline
        ) as stream:
            seen = [e.type async for e in stream]
            with pytest.raises(RuntimeError, match=r"response\.completed"):
                await stream.get_final_response()
    assert seen[-2:] == ["error", "response.failed"]


async def test_client_disconnect_mid_stream_cancels_the_chain(live: Stack) -> None:
    cancelled = await hang_up_mid_stream(
        live,
        "/responses",
        ask("a b c d e f g h i j k l m n o p", model="primary-mini", stream=True),
        lambda line: line == "event: response.output_text.delta",
    )
    assert "nobody waits" in cancelled.reason
