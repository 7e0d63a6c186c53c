"""Anthropic adapter against the sandbox over real HTTP: wire format, parsing, streaming, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from sandbox_fixtures import (
    KEY,
    TWO_CALLS_EXPECTED,
    WEATHER,
    adapter,
    assert_timeout_then_dark,
    req,
    sandbox,
    tool_req,
    two_tools_req,
)

from chainyard.contracts import Message, ToolCall
from chainyard.sandbox import SandboxServer
from chainyard.workers.providers import (
    AnthropicProvider,
    LlmRequest,
    ProviderError,
    parse_anthropic,
)

__all__ = ["sandbox"]


@pytest.fixture
async def an(sandbox: SandboxServer) -> AsyncIterator[AnthropicProvider]:
    async with adapter("anthropic", sandbox.url, AnthropicProvider) as p:
        yield p


async def test_request_wire_format(sandbox: SandboxServer, an: AnthropicProvider) -> None:
    await an.complete(req(temperature=0.5, stop=["END"]))
    c = sandbox.last("anthropic.messages")
    assert c.path == "/v1/messages"
    assert c.headers["x-api-key"] == KEY and "authorization" not in c.headers
    assert c.headers["anthropic-version"] == "2023-06-01"
    assert c.body == {
        "model": "m-1",
        "max_tokens": 1024,  # required by Anthropic; the default when the step sets none
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there world"}]}],
        "system": "be brief",
        "temperature": 0.5,
        "stop_sequences": ["END"],
    }


async def test_response_usage_includes_cache(sandbox: SandboxServer, an: AnthropicProvider) -> None:
    c = await an.complete(req(max_tokens=64))
    assert sandbox.last().body["max_tokens"] == 64
    assert c.output.text == "echo: hello there world" and c.output.finish_reason == "stop"
    # the sandbox reports the 2 system words as cache reads: 3 + 2 + 0
    assert (c.usage.input_tokens, c.usage.output_tokens) == (5, 4)
    assert c.limits is not None and c.limits.remaining_requests == 9_999
    assert c.limits.reset_requests_at_ms is not None and c.limits.reset_tokens_at_ms is not None


async def test_stop_reason_mapping(an: AnthropicProvider) -> None:
    c = await an.complete(req(max_tokens=2))
    assert c.output.text == "echo: hello" and c.output.finish_reason == "length"


async def test_stream_events(sandbox: SandboxServer, an: AnthropicProvider) -> None:
    await sandbox.configure(latency_ms=30)
    deltas: list[str] = []
    c = await an.complete(req("a b c"), deltas.append)
    assert deltas == ["echo:", " a", " b", " c"]
    assert c.output.text == "echo: a b c" and c.output.finish_reason == "stop"
    assert (c.usage.input_tokens, c.usage.output_tokens) == (5, 4)
    assert c.ttft_ms is not None and c.ttft_ms >= 30
    assert sandbox.last().body["stream"] is True
    assert c.limits is not None


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use(sandbox: SandboxServer, an: AnthropicProvider, stream: bool) -> None:
    c = await an.complete(tool_req(), (lambda _: None) if stream else None)
    assert c.output.finish_reason == "tool_calls"
    [call] = c.output.tool_calls
    assert call.name == "get_weather" and call.args == {"city": "Paris"}
    assert call.id.startswith("toolu_")
    assert sandbox.last().body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER.parameters,
        }
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_several_tool_uses(
    sandbox: SandboxServer, an: AnthropicProvider, stream: bool
) -> None:
    c = await an.complete(two_tools_req(), (lambda _: None) if stream else None)
    assert c.output.finish_reason == "tool_calls" and c.output.text == ""
    assert [(t.name, t.args) for t in c.output.tool_calls] == TWO_CALLS_EXPECTED
    ids = [t.id for t in c.output.tool_calls]
    assert all(i.startswith("toolu_") for i in ids) and len(set(ids)) == 2
    assert (c.usage.input_tokens, c.usage.output_tokens) == (14, 4)


async def test_sandbox_streams_tool_use_blocks_in_order(sandbox: SandboxServer) -> None:
    body = {
        "model": "m",
        "max_tokens": 50,
        "stream": True,
        "tools": [
            {"name": n, "input_schema": {"type": "object"}} for n in ("get_weather", "search")
        ],
        "messages": [{"role": "user", "content": two_tools_req().messages[0].content}],
    }
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{sandbox.url}/v1/messages",
            headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            json=body,
        )
    events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: ")]
    blocks = [(e["type"], e["index"]) for e in events if e["type"].startswith("content_block")]
    per_block = ["content_block_start", "content_block_delta", "content_block_delta"]
    per_block.append("content_block_stop")
    assert blocks == [(t, i) for i in (0, 1) for t in per_block]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [(b["type"], b["name"]) for b in starts] == [
        ("tool_use", "get_weather"),
        ("tool_use", "search"),
    ]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


async def test_tool_result_blocks(sandbox: SandboxServer, an: AnthropicProvider) -> None:
    calls = [
        ToolCall(id="t1", name="get_weather", args={"city": "Paris"}),
        ToolCall(id="t2", name="get_weather", args={"city": "Rome"}),
    ]
    r = LlmRequest(
        model="m-1",
        tools=[WEATHER],
        messages=[
            Message(role="user", content="weather?"),
            Message(role="assistant", content="checking", tool_calls=calls),
            Message(role="tool", tool_call_id="t1", content="sunny"),
            Message(role="tool", tool_call_id="t2", content="rain"),
        ],
    )
    c = await an.complete(r)
    sent = sandbox.last().body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "checking"},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "t2", "name": "get_weather", "input": {"city": "Rome"}},
        ],
    }
    # consecutive tool results merge into one user turn, as Anthropic requires
    assert sent[2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "t2", "content": "rain"},
        ],
    }
    assert len(sent) == 3 and c.output.text == "echo: sunny rain"


async def test_json_goes_to_system_prompt(sandbox: SandboxServer, an: AnthropicProvider) -> None:
    await an.complete(req(response_format="json"))
    assert "JSON object" in sandbox.last().body["system"]


@pytest.mark.parametrize(
    ("changes", "cls", "status", "etype"),
    [
        ({"error_rate": 1.0, "error_status": 529}, "retryable", 529, "overloaded_error"),
        ({"error_rate": 1.0, "error_status": 500}, "retryable", 500, "api_error"),
        ({"error_rate": 1.0, "error_status": 400}, "fatal", 400, "invalid_request_error"),
        ({"error_rate": 1.0, "error_status": 404}, "fatal", 404, "not_found_error"),
        ({"error_rate": 1.0, "error_status": 422}, "fatal", 422, "invalid_request_error"),
        ({"api_key": "sk-other"}, "fatal", 401, "authentication_error"),
        ({"context_window": 2}, "context_window", 400, "invalid_request_error"),
        ({"rate_limit_next": 1, "retry_after_ms": 1500}, "retryable", 429, "rate_limit_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_error_classes(
    sandbox: SandboxServer,
    an: AnthropicProvider,
    changes: dict,
    cls: str,
    status: int,
    etype: str,
    stream: bool,
) -> None:
    await sandbox.configure(**changes)
    with pytest.raises(ProviderError) as ei:
        await an.complete(req(), (lambda _: None) if stream else None)
    e = ei.value
    assert (e.cls, e.status) == (cls, status) and etype in e.message
    assert KEY not in str(e) and KEY not in repr(e)
    if status == 429:
        assert e.retry_after_s == 1.5 and e.limits is not None


async def test_prompt_too_long_message(sandbox: SandboxServer, an: AnthropicProvider) -> None:
    await sandbox.configure(context_window=2)
    with pytest.raises(ProviderError) as ei:
        await an.complete(req())
    assert "prompt is too long" in ei.value.message


async def test_timeout_and_dark(sandbox: SandboxServer) -> None:
    await assert_timeout_then_dark(sandbox, "anthropic")


async def test_sandbox_requires_version_header(sandbox: SandboxServer) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{sandbox.url}/v1/messages",
            headers={"x-api-key": KEY},
            json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        )
    assert r.status_code == 400
    assert r.json()["type"] == "error" and "anthropic-version" in r.json()["error"]["message"]


def test_parse_anthropic_headers() -> None:
    h = {
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-tokens-remaining": "39000",
        "anthropic-ratelimit-requests-reset": "2024-01-01T00:00:01Z",
        "anthropic-ratelimit-tokens-reset": "2024-01-01T00:01:00+00:00",
    }
    limits = parse_anthropic(h)
    assert limits is not None
    assert (limits.remaining_requests, limits.remaining_tokens) == (49, 39_000)
    assert limits.reset_requests_at_ms == 1_704_067_201_000
    assert limits.reset_tokens_at_ms == 1_704_067_260_000
    assert parse_anthropic({}) is None
