"""Gemini adapter against the sandbox over real HTTP: wire format, parsing, streaming, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
from chainyard.workers.providers import GeminiProvider, LlmRequest, ProviderError, make_provider

__all__ = ["sandbox"]


@pytest.fixture
async def gm(sandbox: SandboxServer) -> AsyncIterator[GeminiProvider]:
    async with adapter("gemini", sandbox.url, GeminiProvider) as p:
        yield p


async def test_request_wire_format(sandbox: SandboxServer, gm: GeminiProvider) -> None:
    await gm.complete(req(max_tokens=20, temperature=0.2, stop=["END"], response_format="json"))
    c = sandbox.last("gemini.generate")
    assert c.path == "/v1beta/models/m-1:generateContent"
    assert c.headers["x-goog-api-key"] == KEY and c.query == {}  # never in the URL
    assert c.body == {
        "contents": [{"role": "user", "parts": [{"text": "hello there world"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}]},
        "generationConfig": {
            "maxOutputTokens": 20,
            "temperature": 0.2,
            "stopSequences": ["END"],
            "responseMimeType": "application/json",
        },
    }


async def test_response_and_usage(gm: GeminiProvider) -> None:
    c = await gm.complete(req())
    assert c.output.text == "echo: hello there world" and c.output.finish_reason == "stop"
    assert (c.usage.input_tokens, c.usage.output_tokens) == (5, 4)
    assert c.model == "m-1" and c.limits is None  # Gemini sends no rate-limit headers


async def test_max_tokens_finish(gm: GeminiProvider) -> None:
    c = await gm.complete(req(max_tokens=1))
    assert c.output.text == "echo:" and c.output.finish_reason == "length"


async def test_stream(sandbox: SandboxServer, gm: GeminiProvider) -> None:
    await sandbox.configure(latency_ms=30)
    deltas: list[str] = []
    c = await gm.complete(req("a b c"), deltas.append)
    assert deltas == ["echo: a", " b c"]  # two words per chunk, in order
    assert c.output.text == "echo: a b c"
    assert (c.usage.input_tokens, c.usage.output_tokens) == (5, 4)
    assert c.ttft_ms is not None and c.ttft_ms >= 30
    last = sandbox.last("gemini.stream")
    assert last.path == "/v1beta/models/m-1:streamGenerateContent"
    assert last.query == {"alt": "sse"}


@pytest.mark.parametrize("stream", [False, True])
async def test_function_call(sandbox: SandboxServer, gm: GeminiProvider, stream: bool) -> None:
    c = await gm.complete(tool_req(), (lambda _: None) if stream else None)
    assert c.output.finish_reason == "tool_calls"
    [call] = c.output.tool_calls
    assert call.name == "get_weather" and call.args == {"city": "Paris"} and call.id
    assert sandbox.last().body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER.parameters,
                }
            ]
        }
    ]


@pytest.mark.parametrize("stream", [False, True])
async def test_several_function_calls(
    sandbox: SandboxServer, gm: GeminiProvider, stream: bool
) -> None:
    c = await gm.complete(two_tools_req(), (lambda _: None) if stream else None)
    assert c.output.finish_reason == "tool_calls" and c.output.text == ""
    assert [(t.name, t.args) for t in c.output.tool_calls] == TWO_CALLS_EXPECTED
    assert len({t.id for t in c.output.tool_calls}) == 2
    assert (c.usage.input_tokens, c.usage.output_tokens) == (14, 4)


async def test_function_response_parts(sandbox: SandboxServer, gm: GeminiProvider) -> None:
    r = LlmRequest(
        model="m-1",
        tools=[WEATHER],
        messages=[
            Message(role="user", content="weather?"),
            Message(
                role="assistant",
                tool_calls=[ToolCall(id="c1", name="get_weather", args={"city": "Paris"})],
            ),
            Message(role="tool", tool_call_id="c1", content='{"sky": "clear"}'),
        ],
    )
    c = await gm.complete(r)
    sent = sandbox.last().body["contents"]
    assert sent[1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
    }
    assert sent[2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}}],
    }
    assert c.output.text == 'echo: {"sky":"clear"}'


@pytest.mark.parametrize(
    ("changes", "cls", "status", "grpc"),
    [
        ({"error_rate": 1.0, "error_status": 500}, "retryable", 500, "INTERNAL"),
        ({"error_rate": 1.0, "error_status": 503}, "retryable", 503, "UNAVAILABLE"),
        ({"error_rate": 1.0, "error_status": 400}, "fatal", 400, "INVALID_ARGUMENT"),
        ({"error_rate": 1.0, "error_status": 404}, "fatal", 404, "NOT_FOUND"),
        ({"error_rate": 1.0, "error_status": 422}, "fatal", 422, "FAILED_PRECONDITION"),
        ({"api_key": "sk-other"}, "fatal", 401, "UNAUTHENTICATED"),
        ({"context_window": 2}, "context_window", 400, "INVALID_ARGUMENT"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_error_classes(
    sandbox: SandboxServer,
    gm: GeminiProvider,
    changes: dict,
    cls: str,
    status: int,
    grpc: str,
    stream: bool,
) -> None:
    await sandbox.configure(**changes)
    with pytest.raises(ProviderError) as ei:
        await gm.complete(req(), (lambda _: None) if stream else None)
    e = ei.value
    assert (e.cls, e.status) == (cls, status) and grpc in e.message
    assert KEY not in str(e) and KEY not in repr(e)


async def test_429_retry_info(sandbox: SandboxServer, gm: GeminiProvider) -> None:
    # no retry-after headers: the delay comes from the google.rpc.RetryInfo detail
    await sandbox.configure(rate_limit_for_s=60, retry_after_s=4)
    with pytest.raises(ProviderError) as ei:
        await gm.complete(req())
    e = ei.value
    assert (e.cls, e.status, e.retry_after_s) == ("retryable", 429, 4.0)
    assert "RESOURCE_EXHAUSTED" in e.message and e.limits is None


async def test_timeout_and_dark(sandbox: SandboxServer) -> None:
    await assert_timeout_then_dark(sandbox, "gemini")


async def test_versioned_base_url(sandbox: SandboxServer) -> None:
    p = make_provider("gemini", f"{sandbox.url}/v1beta", KEY)
    assert (await p.complete(req())).output.text == "echo: hello there world"
    assert sandbox.last().path == "/v1beta/models/m-1:generateContent"
    await p.aclose()
