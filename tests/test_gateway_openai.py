"""`chainyard gateway` with the official `openai` SDK, unchanged but for base_url and key, over
a live deployment (tests/gateway_stack.py): two gateway and two router processes, a worker
process per pool, sandbox providers. Shapes are checked against OpenAI's OpenAPI document."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import time
from collections.abc import AsyncIterator

import anthropic
import httpx
import openai
import pytest
import pytest_asyncio
import yaml
from gateway_stack import KEYS, PROVIDER_KEY, Stack, hang_up_mid_stream, live_stack
from helpers import Events, stream_events, wait_until
from multidict import CIMultiDict, CIMultiDictProxy
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue
from test_sandbox_openapi import SPEC, validate

from chainyard import trace_view
from chainyard.contracts import ChainCancelled, Route, StepCompleted, StepFailed
from chainyard.gateway import openai as gateway_openai
from chainyard.gateway.core import ApiError, Hints, hints
from chainyard.router.cache import bucket_name

pytestmark = pytest.mark.asyncio(loop_scope="module")
needs_spec = pytest.mark.skipif(not SPEC.exists(), reason=f"no OpenAI OpenAPI document at {SPEC}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with live_stack(tmp_path_factory.mktemp("gw")) as s:
        yield s
        assert PROVIDER_KEY not in s.logs_text()  # nor in any log line


def request_properties(schema: str = "CreateChatCompletionRequest") -> set[str]:
    """Every property of a request's schema, through its allOf and $refs."""
    schemas = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schemas = schemas["components"]["schemas"]
    names: set[str] = set()

    def walk(node: dict[str, object]) -> None:
        ref = node.get("$ref")
        if isinstance(ref, str):
            walk(schemas[ref.rsplit("/", 1)[-1]])
        names.update(node.get("properties", {}))  # type: ignore[arg-type]
        for part in node.get("allOf", []):  # type: ignore[attr-defined]
            walk(part)

    walk(schemas[schema])
    return names


@needs_spec
async def test_every_accepted_argument_is_one_openai_knows() -> None:
    known = request_properties()
    assert "messages" in known and "frobnicate" not in known
    assert gateway_openai.KNOWN <= known, gateway_openai.KNOWN - known


def sdk(live: Stack, key: str = KEYS["acme"], i: int = 0, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.v1(i), api_key=key, max_retries=0, **kw)


def auth(key: str = KEYS["acme"]) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def ask(text: str, **kw: object) -> dict[str, object]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **kw}


@needs_spec
async def test_plain_completion_in_openai_shape(live: Stack) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{live.v1()}/chat/completions", headers=auth(), json=ask("hello there")
        )
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["content"] == "echo: hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    chain_id = r.headers["x-chainyard-chain-id"]
    assert body["id"] == f"chatcmpl-{chain_id}"
    validate(ask("hello there"), "CreateChatCompletionRequest")


async def test_sdk_plain_and_headers(live: Stack) -> None:
    async with sdk(live) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="small",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "two words"}]},
            ],
            max_tokens=16,
            temperature=0,
            stop=["zzz"],
            user="u-42",
            metadata={"team": "bi"},
            extra_headers={
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            },
        )
    done = raw.parse()
    assert done.choices[0].message.content == "echo: two words"
    assert raw.headers["x-chainyard-chain-id"].startswith("chat-")
    assert raw.headers["x-chainyard-trace-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    sent = live.sandboxes["primary"].last("openai.chat")
    assert sent.body["max_tokens"] == 16 and sent.body["stop"] == ["zzz"]
    async with httpx.AsyncClient(timeout=30) as http:
        chain_id = raw.headers["x-chainyard-chain-id"]
        state = (await http.get(f"{live.v1()}/chains/{chain_id}", headers=auth())).json()
    assert state["chain"]["metadata"] == {"team": "bi", "user": "u-42"}


@needs_spec
async def test_streaming_chunks_end_with_usage_and_done(live: Stack) -> None:
    body = ask("one two three four five", stream=True, stream_options={"include_usage": True})
    chunks = []
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream(
            "POST", f"{live.v1()}/chat/completions", headers=auth(), json=body
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks.append(line.removeprefix("data: "))
    assert chunks[-1] == "[DONE]"
    decoded = [json.loads(c) for c in chunks[:-1]]
    for c in decoded:
        validate(c, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in decoded if c["choices"])
    assert text == "echo: one two three four five"
    assert decoded[-1]["choices"] == [] and decoded[-1]["usage"]["completion_tokens"] == 6
    assert decoded[-2]["choices"][0]["finish_reason"] == "stop"


async def test_sdk_streaming(live: Stack) -> None:
    async with sdk(live) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream this please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
    assert "".join(parts) == "echo: stream this please"
    assert usage is not None and usage.completion_tokens == 4


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


async def test_sdk_tool_call_round_trip(live: Stack) -> None:
    async with sdk(live) as client:
        first = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": 'call get_weather {"city": "Paris"}'}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="auto",
        )
        msg = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls"
        assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        call = msg.tool_calls[0]
        assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        second = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[
                {"role": "user", "content": 'call get_weather {"city": "Paris"}'},
                msg.model_dump(exclude_none=True),  # type: ignore[list-item]
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
            ],
            tools=[WEATHER],  # type: ignore[list-item]
        )
    assert second.choices[0].message.content == "echo: sunny, 21 C"


async def test_sdk_tool_choice_reaches_the_provider(live: Stack) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    async with sdk(live) as client:
        for choice, sent in (("required", "required"), (named, named), ("none", "none")):
            await client.chat.completions.create(
                model="primary-mini",
                messages=[{"role": "user", "content": "weather?"}],
                tools=[WEATHER],  # type: ignore[list-item]
                tool_choice=choice,  # type: ignore[arg-type]
            )
            assert live.sandboxes["primary"].last("openai.chat").body["tool_choice"] == sent
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="primary-mini",
                messages=[{"role": "user", "content": "weather?"}],
                tools=[WEATHER],  # type: ignore[list-item]
                tool_choice={"type": "function"},  # type: ignore[typeddict-item]
            )
        assert bad.value.param == "tool_choice"


async def test_sdk_streamed_tool_call(live: Stack) -> None:
    async with sdk(live) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": 'call get_weather {"city": "Oslo"}'}],
            tools=[WEATHER],  # type: ignore[list-item]
            stream=True,
        )
        calls, finish = [], None
        async for chunk in stream:
            for ch in chunk.choices:
                calls += ch.delta.tool_calls or []
                finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert [c.function.name for c in calls] == ["get_weather"]  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]


async def test_sdk_json_schema_output(live: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    }
    async with sdk(live) as client:
        done = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "plan a trip"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "trip", "schema": schema, "strict": True},
            },
        )
        mode = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "json please"}],
            response_format={"type": "json_object"},
        )
    data = json.loads(done.choices[0].message.content or "")
    assert isinstance(data["city"], str) and isinstance(data["days"], int)
    sent = live.sandboxes["primary"].captured
    assert any(c.body.get("response_format", {}).get("type") == "json_schema" for c in sent)
    assert json.loads(mode.choices[0].message.content or "") == {"echo": "json please"}


async def test_sdk_errors_have_openai_shape_and_status(live: Stack) -> None:
    async with sdk(live) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], n=2
            )
        assert bad.value.status_code == 400 and bad.value.param == "n"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(
                model="gpt-9", messages=[{"role": "user", "content": "x"}]
            )
        assert missing.value.code == "model_not_found" and missing.value.param == "model"
        with pytest.raises(openai.BadRequestError) as extra:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "x"}],
                extra_body={"frobnicate": True},
            )
        assert extra.value.param == "frobnicate"
    async with sdk(live, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
    async with sdk(live, key=KEYS["narrow"]) as client:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        assert denied.value.param == "model"
        ok = await client.chat.completions.create(
            model="backup-mini", messages=[{"role": "user", "content": "allowed"}]
        )
        assert ok.choices[0].message.content == "echo: allowed"


async def test_endpoints_not_served_answer_404_in_the_fronts_shape(live: Stack) -> None:
    async with sdk(live) as client:
        with pytest.raises(openai.NotFoundError) as embeddings:
            await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert embeddings.value.message.endswith("no such endpoint: POST /v1/embeddings")
    assert embeddings.value.type == "not_found_error"
    claude = anthropic.AsyncAnthropic(base_url=live.gateways[0], api_key=KEYS["acme"])
    async with claude:
        with pytest.raises(anthropic.NotFoundError) as counted:
            await claude.messages.count_tokens(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
    assert counted.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "POST /v1/messages/count_tokens" in counted.value.message


@needs_spec
async def test_errors_and_models_match_the_openapi_document(live: Stack) -> None:
    async with httpx.AsyncClient(base_url=live.v1(), timeout=30) as http:
        for bad in (ask("x", n=3), ask("x") | {"model": "gpt-9"}):
            r = await http.post("/chat/completions", headers=auth(), json=bad)
            assert r.status_code in (400, 404)
            validate(r.json(), "ErrorResponse")
        r = await http.post("/chat/completions", json=ask("x"))  # no key
        assert r.status_code == 401
        validate(r.json(), "ErrorResponse")
        models = await http.get("/models", headers=auth())
        validate(models.json(), "ListModelsResponse")
        one = await http.get("/models/small", headers=auth())
        validate(one.json(), "Model")


async def test_bad_input_never_crashes_the_gateway(live: Stack) -> None:
    url = f"{live.v1()}/chat/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        cases = {
            "malformed": (b'{"model": "gpt-4o-mini",, }', 400, None),
            "not an object": (b"[1, 2]", 400, None),
            "wrong type": (json.dumps(ask("x", max_tokens="many")).encode(), 400, "max_tokens"),
            "no messages": (json.dumps(ask("x") | {"messages": []}).encode(), 400, "messages"),
            "no model": (json.dumps({"messages": ask("x")["messages"]}).encode(), 400, "model"),
            "image part": (
                json.dumps(
                    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}
                ).encode(),
                400,
                "messages[0].content[0]",
            ),
            "oversized": (json.dumps(ask("x" * 100_000)).encode(), 413, None),
        }  # fmt: skip
        for name, (data, status, param) in cases.items():
            r = await http.post(
                url, headers={**auth(), "content-type": "application/json"}, content=data
            )
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, name
            assert err["param"] == param, (name, err)
        bad_hint = await http.post(
            url, headers={**auth(), "x-chainyard-max-cost-usd": "lots"}, json=ask("x")
        )
        assert (
            bad_hint.status_code == 400
            and bad_hint.json()["error"]["param"] == "x-chainyard-max-cost-usd"
        )
        assert (await http.get(f"{live.url}/healthz")).status_code == 200
        assert (await http.get(f"{live.url}/readyz")).status_code == 200
        r = await http.post(url, headers=auth(), json=ask("still alive"))
        assert r.json()["choices"][0]["message"]["content"] == "echo: still alive"


async def test_bodies_without_a_length_or_compressed_are_read_and_capped(live: Stack) -> None:
    """A chunked body (no Content-Length) is read as it comes, a gzip body once inflated; both
    are refused with 413 past the cap (64 KB here), counted after decompression."""
    url = f"{live.v1()}/chat/completions"

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    small = json.dumps(ask("chunked")).encode()
    big = json.dumps(ask("x" * 100_000)).encode()
    headers = {**auth(), "content-type": "application/json"}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url, headers=headers, content=chunks(small))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: chunked"
        r = await http.post(url, headers=headers, content=chunks(big))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        zipped = {**headers, "content-encoding": "gzip"}
        r = await http.post(url, headers=zipped, content=gzip.compress(small))
        assert r.json()["choices"][0]["message"]["content"] == "echo: chunked", r.text
        packed = gzip.compress(big)  # a few hundred bytes on the wire, 100 KB inflated
        assert len(packed) < 64 * 1024 < len(big)
        r = await http.post(url, headers=zipped, content=packed)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text


@pytest.mark.skipif(
    any(k.startswith("OTEL_") for k in os.environ), reason="tracing may be on: a span's trace id"
)
async def test_no_trace_id_without_a_callers_trace(live: Stack) -> None:
    """Tracing is off in this stack: the trace id returned is the caller's, and without a
    `traceparent` there is none."""
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{live.v1()}/chat/completions", headers=auth(), json=ask("x"))
    assert r.status_code == 200, r.text
    assert "x-chainyard-trace-id" not in r.headers
    assert r.headers["x-chainyard-chain-id"].startswith("chat-")


async def test_hint_headers_are_found_in_any_case() -> None:
    """Without a hint header the route is the default one; with one, in any letter case (as
    aiohttp's headers are), it is read, and a malformed one is still refused."""
    assert hints(CIMultiDictProxy(CIMultiDict({"Accept": "*/*"}))) == Hints(route=Route())
    mixed = hints(CIMultiDictProxy(CIMultiDict({"X-Chainyard-Avoid": "a, b"})))
    assert mixed.route.avoid == ["a", "b"]
    with pytest.raises(ApiError) as bad:
        hints(CIMultiDictProxy(CIMultiDict({"X-CHAINYARD-DEADLINE-MS": "0"})))
    assert bad.value.status == 400 and bad.value.param == "x-chainyard-deadline-ms"


async def test_routing_headers_reach_the_router(live: Stack) -> None:
    async with sdk(live) as client:
        avoided = await client.chat.completions.create(
            **ask("not on primary"),
            extra_headers={"x-chainyard-avoid": "primary"},  # type: ignore[arg-type]
        )
        preferred = await client.chat.completions.create(
            **ask("backup please"),  # type: ignore[arg-type]
            extra_headers={"x-chainyard-prefer": "backup-mini", "x-chainyard-strategy": "fastest"},
        )
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                **ask("x"),
                extra_headers={"x-chainyard-strategy": "random"},  # type: ignore[arg-type]
            )
    assert bad.value.param == "x-chainyard-strategy"
    for done in (avoided, preferred):
        events = await step_events(live, done.id.removeprefix("chatcmpl-"))
        assert {e.target.pool for e in events if isinstance(e, StepCompleted)} == {"backup"}


async def test_deadline_header_gives_504(live: Stack) -> None:
    async with sdk(live) as client:
        with pytest.raises(openai.APIStatusError) as late:
            await client.chat.completions.create(
                model="slow-model",
                messages=[{"role": "user", "content": "take your time"}],
                extra_headers={"x-chainyard-deadline-ms": "500"},
            )
    assert late.value.status_code == 504
    assert "deadline" in late.value.message


async def test_models_lists_what_the_key_may_use(live: Stack) -> None:
    async with sdk(live) as client:
        names = {m.id async for m in client.models.list()}
    assert {"gpt-4o-mini", "small", "primary-mini", "backup-mini", "slow-model"} <= names
    async with sdk(live, key=KEYS["narrow"]) as client:
        assert [m.id async for m in client.models.list()] == ["backup-mini"]


async def step_events(live: Stack, chain_id: str, tenant: str = "acme") -> list[object]:
    return list(await stream_events(live.bus.js, f"cy.events.{tenant}.{chain_id}.>"))


async def test_idempotency_key_across_two_gateway_replicas_runs_once(live: Stack) -> None:
    calls_before = live.sandboxes["primary"].counts["openai.chat"]
    headers = {"Idempotency-Key": "order-7731"}
    async with sdk(live, i=0) as a, sdk(live, i=1) as b:
        answers = await asyncio.gather(
            a.chat.completions.with_raw_response.create(
                **ask("charge once"),
                extra_headers=headers,  # type: ignore[arg-type]
            ),
            b.chat.completions.with_raw_response.create(
                **ask("charge once"),
                extra_headers=headers,  # type: ignore[arg-type]
            ),
        )
        first = answers[0].parse().created
        # a retry in a later second still answers with the first answer's `created`
        await wait_until(lambda: int(time.time()) > first, 5, "the clock's next second")
        again = await a.chat.completions.with_raw_response.create(
            **ask("charge once"),
            extra_headers=headers,  # type: ignore[arg-type]
        )
        with pytest.raises(openai.ConflictError):  # the same key with another request
            await b.chat.completions.create(**ask("charge twice"), extra_headers=headers)  # type: ignore[arg-type]
    ids = {r.headers["x-chainyard-chain-id"] for r in (*answers, again)}
    assert len(ids) == 1
    bodies = [r.parse() for r in (*answers, again)]
    assert {b.id for b in bodies} == {f"chatcmpl-{ids.pop()}"}
    assert {b.choices[0].message.content for b in bodies} == {"echo: charge once"}
    assert {b.created for b in bodies} == {first}
    chain_id = bodies[0].id.removeprefix("chatcmpl-")
    events = await step_events(live, chain_id)
    assert sum(isinstance(e, StepCompleted) for e in events) == 1
    assert live.sandboxes["primary"].counts["openai.chat"] == calls_before + 1


async def test_streamed_retry_with_idempotency_key_replays_the_first_answer(live: Stack) -> None:
    headers = {"Idempotency-Key": "stream-retry-1"}
    texts, ids, created = [], set(), set()
    for i in (0, 1):  # the retry goes to the other replica, after the first has ended
        if created:  # ... in a later second: it still answers with the first `created`
            await wait_until(lambda: int(time.time()) > min(created), 5, "the next second")
        async with sdk(live, i=i) as client:
            stream = await client.chat.completions.create(
                **ask("say it once"),
                stream=True,
                extra_headers=headers,  # type: ignore[arg-type]
            )
            parts = []
            async for chunk in stream:
                ids.add(chunk.id)
                created.add(chunk.created)
                parts += [c.delta.content or "" for c in chunk.choices]
            texts.append("".join(parts))
    assert texts == ["echo: say it once"] * 2
    assert len(created) == 1
    [chat_id] = ids
    events = await step_events(live, chat_id.removeprefix("chatcmpl-"))
    assert sum(isinstance(e, StepCompleted) for e in events) == 1


async def test_cache_header_answers_a_repeat_without_a_provider_call(live: Stack) -> None:
    def calls() -> int:
        return sum(sb.counts["openai.chat"] for sb in live.sandboxes.values())

    headers = {"x-chainyard-cache-ttl-s": "60"}
    cache = await live.bus.js.key_value(bucket_name(live.bus.subjects.prefix))
    async with sdk(live) as client:
        create = client.chat.completions.with_raw_response.create
        raw = await create(**ask("cache me 7"), extra_headers=headers)  # type: ignore[arg-type]
        assert raw.headers["x-chainyard-cache"] == "miss"
        first = raw.parse()
        # the answer is stored in the cache when the router records the step, just after the
        # caller has it (docs/GATEWAY.md): a repeat is a hit once the entry is there
        await wait_until(lambda: _has_keys(cache), 10, "the answer in the cache")
        before = calls()
        raw = await create(**ask("cache me 7"), extra_headers=headers)  # type: ignore[arg-type]
        assert raw.headers["x-chainyard-cache"] == "hit"
        again = raw.parse()
        plain = await create(**ask("not cached"))  # type: ignore[arg-type]
        assert "x-chainyard-cache" not in plain.headers
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                **ask("x"),  # type: ignore[arg-type]
                extra_headers={"x-chainyard-cache-ttl-s": "0"},
            )
    assert bad.value.param == "x-chainyard-cache-ttl-s"
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.id != first.id and calls() == before + 1  # the uncached request's call
    [done] = [e for e in await step_events(live, again.id.removeprefix("chatcmpl-"))
              if isinstance(e, StepCompleted)]  # fmt: skip
    assert done.cached


async def _has_keys(kv: KeyValue) -> bool:
    try:
        return bool(await kv.keys())
    except NoKeysError:
        return False


async def test_provider_failing_over_mid_test(live: Stack) -> None:
    def ask_ha(text: str) -> dict[str, object]:
        return ask(text) | {"model": "ha-model"}

    async with sdk(live) as client:
        before = await client.chat.completions.create(**ask_ha("before"))  # type: ignore[arg-type]
        await live.sandboxes["flaky"].configure(dark=True)
        try:
            answers = await asyncio.gather(
                *(client.chat.completions.create(**ask_ha(f"during {i}")) for i in range(6))  # type: ignore[arg-type]
            )
        finally:
            await live.sandboxes["flaky"].configure(dark=False)
    assert [a.choices[0].message.content for a in answers] == [
        f"echo: during {i}" for i in range(6)
    ]
    assert before.choices[0].message.content == "echo: before"
    served, failed, failed_over = set(), set(), []
    for a in (before, *answers):
        for e in await step_events(live, a.id.removeprefix("chatcmpl-")):
            if isinstance(e, StepCompleted | StepFailed):
                (served if isinstance(e, StepCompleted) else failed).add(e.target.pool)
            if isinstance(e, StepFailed):
                failed_over.append(e.chain_id)
    assert served == {"flaky", "spare"}  # before on the cheapest, during on the other
    assert failed == {"flaky"}  # the failed attempts, failed over
    out = io.StringIO()  # and `chainyard trace` shows it
    code = await trace_view.run(failed_over[0], nats_url=live.nats.url, tenant="acme", out=out)
    drawn = out.getvalue()
    assert code == 0 and "call #1" in drawn and "call #2" in drawn, drawn
    assert "flaky-ha: retryable 503" in drawn and "spare-ha" in drawn, drawn


async def test_provider_error_reaches_caller_without_the_provider_key(live: Stack) -> None:
    await live.sandboxes["backup"].configure(error_rate=1.0, error_status=400)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(
                f"{live.v1()}/chat/completions",
                headers=auth(),
                json=ask("x") | {"model": "backup-mini"},
            )
            s = await http.post(
                f"{live.v1()}/chat/completions",
                headers=auth(),
                json=ask("x", stream=True) | {"model": "backup-mini"},
            )
    finally:
        await live.sandboxes["backup"].configure(error_rate=0.0)
    assert r.status_code == 400 and "provider refused" in r.json()["error"]["message"]
    assert s.status_code == 400
    for text in (r.text, s.text, str(r.headers), str(s.headers)):
        assert PROVIDER_KEY not in text


async def test_client_disconnect_mid_stream_cancels_the_chain(live: Stack) -> None:
    cancelled = await hang_up_mid_stream(
        live,
        "/chat/completions",
        ask("a b c d e f g h i j k l m n o p", stream=True),
        lambda line: '"content":"echo' in line or '"content": "echo' in line,
    )
    assert "nobody waits" in cancelled.reason


async def test_client_giving_up_on_a_plain_request_cancels_the_chain(live: Stack) -> None:
    async with Events(live.bus.nc, "cy.events.acme.>") as ev:
        async with httpx.AsyncClient(timeout=0.8) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(
                    f"{live.v1()}/chat/completions",
                    headers=auth(),
                    json=ask("slow answer") | {"model": "slow-model"},
                )
        cancelled = await ev.wait(lambda e: isinstance(e, ChainCancelled), 20)
    assert isinstance(cancelled, ChainCancelled) and "nobody waits" in cancelled.reason
