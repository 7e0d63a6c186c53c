"""OpenAI adapter against the sandbox over real HTTP: wire format, parsing, streaming, errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from sandbox_fixtures import (
    KEY,
    TWO_CALLS_EXPECTED,
    WEATHER,
    adapter,
    req,
    sandbox,
    tool_req,
    two_tools_req,
)

from chainyard.contracts import Message, ToolCall
from chainyard.sandbox import SandboxServer
from chainyard.workers.providers import (
    LlmRequest,
    OpenAIProvider,
    ProviderError,
    format_go_duration,
    make_provider,
    parse_go_duration,
    parse_openai,
    parse_retry_after,
)
from chainyard.workers.providers.openai import decode_args

__all__ = ["sandbox"]


@pytest.fixture
async def ai(sandbox: SandboxServer) -> AsyncIterator[OpenAIProvider]:
    async with adapter("openai", f"{sandbox.url}/v1", OpenAIProvider) as p:
        yield p


async def test_request_wire_format(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    await ai.complete(req(max_tokens=50, temperature=0.3, stop=["END"]))
    c = sandbox.last("openai.chat")
    assert c.path == "/v1/chat/completions"
    assert c.headers["authorization"] == f"Bearer {KEY}"
    assert c.headers["content-type"] == "application/json"
    assert c.body == {
        "model": "m-1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there world"},
        ],
        "max_tokens": 50,
        "temperature": 0.3,
        "stop": ["END"],
    }
    assert sandbox.counts["openai.chat"] == 1


async def test_max_completion_tokens_option(sandbox: SandboxServer) -> None:
    p = make_provider("vllm", f"{sandbox.url}/v1", KEY, max_completion_tokens=True)
    await p.complete(req(max_tokens=7))
    body = sandbox.last().body
    assert body["max_completion_tokens"] == 7 and "max_tokens" not in body
    await p.aclose()


async def test_response_usage_and_limits(ai: OpenAIProvider) -> None:
    before = int(time.time() * 1000)
    c = await ai.complete(req())
    assert c.output.text == "echo: hello there world"
    assert c.output.finish_reason == "stop"
    assert (c.usage.input_tokens, c.usage.output_tokens) == (5, 4)
    assert c.model == "m-1" and c.ttft_ms is None
    assert c.limits is not None
    assert c.limits.remaining_requests == 10_000 - 1
    assert c.limits.remaining_tokens == 2_000_000 - 9
    assert c.limits.reset_requests_at_ms is not None
    assert before + 900 <= c.limits.reset_requests_at_ms <= before + 1000 + 5_000
    assert c.limits.reset_tokens_at_ms is not None
    assert c.limits.reset_tokens_at_ms - c.limits.reset_requests_at_ms == pytest.approx(
        359_000, abs=2_000
    )


async def test_length_finish(ai: OpenAIProvider) -> None:
    c = await ai.complete(req(max_tokens=2))
    assert c.output.text == "echo: hello" and c.output.finish_reason == "length"


async def test_stream_deltas_usage_ttft(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    await sandbox.configure(latency_ms=40)
    deltas: list[str] = []
    c = await ai.complete(req("one two three four"), deltas.append)
    assert deltas == ["echo:", " one", " two", " three", " four"]
    assert c.output.text == "".join(deltas)
    assert (c.usage.input_tokens, c.usage.output_tokens) == (6, 5)
    assert c.ttft_ms is not None and c.ttft_ms >= 40
    body = sandbox.last().body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert c.limits is not None and c.limits.remaining_requests == 9_999


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_call_parsed(sandbox: SandboxServer, ai: OpenAIProvider, stream: bool) -> None:
    deltas: list[str] = []
    c = await ai.complete(tool_req(), deltas.append if stream else None)
    assert c.output.finish_reason == "tool_calls"
    assert len(c.output.tool_calls) == 1
    call = c.output.tool_calls[0]
    assert call.name == "get_weather" and call.args == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert sandbox.last().body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER.parameters,
            },
        }
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_several_tool_calls(sandbox: SandboxServer, ai: OpenAIProvider, stream: bool) -> None:
    deltas: list[str] = []
    c = await ai.complete(two_tools_req(), deltas.append if stream else None)
    assert c.output.finish_reason == "tool_calls" and c.output.text == "" and deltas == []
    assert [(t.name, t.args) for t in c.output.tool_calls] == TWO_CALLS_EXPECTED
    ids = [t.id for t in c.output.tool_calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    # input: the 14 words of the prompt; output: per call its name and its one-word arguments
    assert (c.usage.input_tokens, c.usage.output_tokens) == (14, 4)


async def test_tool_result_round_trip(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    call = ToolCall(id="call_1", name="get_weather", args={"city": "Paris"})
    r = LlmRequest(
        model="m-1",
        tools=[WEATHER],
        messages=[
            Message(role="user", content="call get_weather"),
            Message(role="assistant", tool_calls=[call]),
            Message(role="tool", tool_call_id="call_1", content="sunny"),
        ],
    )
    c = await ai.complete(r)
    assert c.output.text == "echo: sunny" and not c.output.tool_calls
    sent = sandbox.last().body["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": "",  # "" rather than null: llama.cpp's server refuses null
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
    }
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


async def test_json_modes(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    c = await ai.complete(req("hi", response_format="json"))
    assert sandbox.last().body["response_format"] == {"type": "json_object"}
    assert c.output.data == {"echo": "hi"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    c = await ai.complete(req("hi", response_format="json", json_schema=schema))
    rf = sandbox.last().body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"] == schema
    assert c.output.data == {"echo": "hi", "n": 0}


def test_decode_args_keeps_bad_json() -> None:
    assert decode_args('{"a": 1}') == {"a": 1}
    assert decode_args("{not json") == {"_raw": "{not json"}
    assert decode_args("[1]") == {"_raw": "[1]"}
    assert decode_args("") == {}


@pytest.mark.parametrize(
    ("changes", "cls", "status"),
    [
        ({"error_rate": 1.0, "error_status": 500}, "retryable", 500),
        ({"error_rate": 1.0, "error_status": 503}, "retryable", 503),
        ({"error_rate": 1.0, "error_status": 529}, "retryable", 529),
        ({"error_rate": 1.0, "error_status": 408}, "retryable", 408),
        ({"error_rate": 1.0, "error_status": 400}, "fatal", 400),
        ({"error_rate": 1.0, "error_status": 403}, "fatal", 403),
        ({"error_rate": 1.0, "error_status": 404}, "fatal", 404),
        ({"error_rate": 1.0, "error_status": 422}, "fatal", 422),
        ({"api_key": "sk-other"}, "fatal", 401),
        ({"context_window": 3}, "context_window", 400),
        ({"dark": True}, "retryable", 503),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_error_classes(
    sandbox: SandboxServer, ai: OpenAIProvider, changes: dict, cls: str, status: int, stream: bool
) -> None:
    await sandbox.configure(**changes)
    with pytest.raises(ProviderError) as ei:
        await ai.complete(req(), (lambda _: None) if stream else None)
    assert (ei.value.cls, ei.value.status) == (cls, status)
    assert KEY not in str(ei.value) and KEY not in repr(ei.value)


async def test_context_window_message(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    await sandbox.configure(context_window=3)
    with pytest.raises(ProviderError) as ei:
        await ai.complete(req())
    assert "context_length_exceeded" in ei.value.message
    assert "maximum context length is 3 tokens" in ei.value.message


async def test_429_retry_after_ms_wins(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    await sandbox.configure(rate_limit_next=1, retry_after_s=7, retry_after_ms=250)
    with pytest.raises(ProviderError) as ei:
        await ai.complete(req())
    e = ei.value
    assert (e.cls, e.status, e.retry_after_s) == ("retryable", 429, 0.25)
    assert e.limits is not None and e.limits.remaining_requests == 9_999
    # the window was one call: the next one goes through
    assert (await ai.complete(req())).output.text.startswith("echo:")


async def test_429_retry_after_seconds(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    await sandbox.configure(rate_limit_every=2, retry_after_s=3)
    await ai.complete(req())
    with pytest.raises(ProviderError) as ei:
        await ai.complete(req())
    assert (ei.value.status, ei.value.retry_after_s) == (429, 3.0)


async def test_timeout_is_retryable(sandbox: SandboxServer) -> None:
    await sandbox.configure(latency_ms=2_000)
    p = make_provider("openai", f"{sandbox.url}/v1", KEY, timeout_s=0.2)
    with pytest.raises(ProviderError) as ei:
        await p.complete(req())
    assert ei.value.cls == "retryable" and ei.value.status is None
    assert "timeout" in ei.value.message.lower()
    await p.aclose()


async def test_connection_refused_when_dark(sandbox: SandboxServer, ai: OpenAIProvider) -> None:
    await sandbox.configure(dark=True, dark_mode="refuse")
    with pytest.raises(ProviderError) as ei:
        await ai.complete(req())
    assert ei.value.cls == "retryable" and ei.value.status is None
    assert KEY not in str(ei.value)
    await sandbox.configure(dark=False)  # same port again
    assert (await ai.complete(req())).output.text == "echo: hello there world"


async def test_key_scrubbed_from_echoed_401(sandbox: SandboxServer) -> None:
    await sandbox.configure(api_key="sk-right")
    p = make_provider("openai", f"{sandbox.url}/v1", KEY)
    with pytest.raises(ProviderError) as ei:
        await p.complete(req())
    assert "Incorrect API key provided: ***" in str(ei.value)  # the sandbox echoed the key
    assert KEY not in str(ei.value) and KEY not in repr(ei.value) and KEY not in repr(p)
    await p.aclose()


async def test_a_long_key_is_scrubbed_where_the_message_is_cut(sandbox: SandboxServer) -> None:
    """Messages are cut short for events; a long key (an OAuth or Azure AD token) echoed
    across the cut is still removed, not left in part."""
    await sandbox.configure(api_key="sk-right")
    long_key = "eyJ" + "a1b2c3d4" * 150  # 1,203 characters
    p = make_provider("openai", f"{sandbox.url}/v1", long_key)
    with pytest.raises(ProviderError) as ei:
        await p.complete(req())
    assert "Incorrect API key provided: ***" in str(ei.value), str(ei.value)
    assert long_key[:40] not in str(ei.value) and len(str(ei.value)) <= 500
    await p.aclose()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1m30.5s", 90.5),
        ("1h2m3s", 3723.0),
        ("250ms", 0.25),
        ("0.5", 0.5),
        ("bogus", None),
        ("1x", None),
    ],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    got = parse_go_duration(text)
    assert got == (pytest.approx(seconds) if seconds is not None else None)
    if seconds is not None:
        assert parse_go_duration(format_go_duration(seconds)) == pytest.approx(seconds)


def test_parse_openai_headers() -> None:
    h = {"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-tokens": "1m30.5s"}
    limits = parse_openai(h, now_ms=1_000)
    assert limits is not None
    assert limits.remaining_requests == 59 and limits.remaining_tokens is None
    assert limits.reset_tokens_at_ms == 1_000 + 90_500 and limits.reset_requests_at_ms is None
    assert parse_openai({}, now_ms=0) is None


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "9"}) == 9.0
    date = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert parse_retry_after({"retry-after": date}, now_s=1445412480.0) == pytest.approx(30.0)
    assert parse_retry_after({}) is None
