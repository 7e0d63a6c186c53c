"""OpenAI Chat Completions, and every server that speaks it (vLLM, Ollama, llama.cpp) by base URL.

`base_url` includes the version, e.g. "https://api.openai.com/v1" or "http://gpu1:8000/v1".
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from chainyard.contracts import Message, Output, ToolCall, Usage
from chainyard.contracts._messages import FinishReason

from ._base import Completion, LlmRequest, OnDelta, RateLimits
from ._errors import boundary, iter_sse, malformed, post_json
from ._http import HttpClient, HttpSettings
from ._ratelimit import parse_openai

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def decode_args(text: str) -> dict[str, Any]:
    """Tool-call arguments as a dict; text the model got wrong is kept, not dropped."""
    if not text:
        return {}
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_raw": text}


def json_data(text: str) -> Any:
    """The decoded JSON of a JSON-mode answer, or None when the model broke the format."""
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None


class _Fn(msgspec.Struct):
    name: str
    arguments: str | None = None


class _Call(msgspec.Struct):
    function: _Fn
    id: str | None = None


class _RespMessage(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_Call] | None = None


class _Choice(msgspec.Struct):
    message: _RespMessage | None = None
    finish_reason: str | None = None


class _Response(msgspec.Struct):
    """The part of a Chat Completions response the adapter reads; the rest is skipped unread."""

    choices: list[_Choice]
    usage: Any = None
    model: str | None = None


_response = msgspec.json.Decoder(_Response)
_NO_MESSAGE = _RespMessage()


def _message(m: Message) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id or "", "content": m.content}
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.role == "assistant" and m.tool_calls:
        out["content"] = m.content  # "" beside tool_calls: valid for OpenAI, required by llama.cpp
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": msgspec.json.encode(c.args).decode()},
            }
            for c in m.tool_calls
        ]
    return out


class OpenAIProvider:
    """Chat Completions adapter. `max_completion_tokens=True` sends that field instead of
    `max_tokens` (required by OpenAI's reasoning models; older compatible servers know only
    `max_tokens`)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 600.0,
        http: HttpSettings | None = None,
        max_completion_tokens: bool = False,
        name: str = "openai",
        headers: dict[str, str] | None = None,
    ) -> None:
        hdrs = {"content-type": "application/json", **(headers or {})}
        if api_key:
            hdrs["authorization"] = f"Bearer {api_key}"
        self.name = name
        self._secrets = (api_key,) if api_key else ()
        self._max_completion_tokens = max_completion_tokens
        self._client = HttpClient(base_url, hdrs, timeout_s, http)

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self._client.base_url!r})"

    def body(self, request: LlmRequest, stream: bool) -> dict[str, Any]:
        """The request body exactly as sent (public so tests and tools can inspect it)."""
        p = request.params
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [_message(m) for m in request.messages],
        }
        if p.max_tokens is not None:
            body["max_completion_tokens" if self._max_completion_tokens else "max_tokens"] = (
                p.max_tokens
            )
        if p.temperature is not None:
            body["temperature"] = p.temperature
        if p.stop:
            body["stop"] = list(p.stop)
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
            # OpenAI's default with tools ("auto") said out loud: llama.cpp's server only offers
            # the tools to the model when tool_choice is given.
            choice = p.tool_choice or "auto"
            body["tool_choice"] = (
                choice
                if choice in ("auto", "none", "required")
                else {"type": "function", "function": {"name": choice}}
            )
        if p.response_format == "json":
            if p.json_schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": p.json_schema, "strict": False},
                }
            else:
                body["response_format"] = {"type": "json_object"}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: LlmRequest, on_delta: OnDelta | None = None) -> Completion:
        if on_delta is not None:
            return await self._stream(request, on_delta)
        data, headers = await post_json(
            self._client, self.name, "/chat/completions", self.body(request, False),
            self._secrets, _response,
        )  # fmt: skip
        with boundary(self.name, self._secrets):
            if not data.choices:
                raise malformed(self.name, "no choices", self._secrets)
            choice = data.choices[0]
            msg = choice.message or _NO_MESSAGE
            calls = [
                ToolCall(
                    id=c.id or f"call_{i}",
                    name=c.function.name,
                    args=decode_args(c.function.arguments or ""),
                )
                for i, c in enumerate(msg.tool_calls or ())
            ]
            return Completion(
                output=self._output(request, msg.content or "", calls, choice.finish_reason),
                usage=_usage(data.usage),
                model=data.model or request.model,
                limits=parse_openai(headers),
            )

    def _output(
        self, request: LlmRequest, text: str, calls: list[ToolCall], finish: str | None
    ) -> Output:
        reason = _FINISH.get(finish or "", "other")
        if calls and reason == "stop":  # some compatible servers say "stop" after tool calls
            reason = "tool_calls"
        data = json_data(text) if request.params.response_format == "json" and text else None
        return Output(text=text, data=data, tool_calls=calls, finish_reason=reason)

    async def _stream(self, request: LlmRequest, on_delta: OnDelta) -> Completion:
        started = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        calls: dict[int, dict[str, str]] = {}  # tool calls arrive in pieces, keyed by index
        finish: str | None = None
        usage = Usage()
        model = request.model
        limits: list[RateLimits | None] = [None]

        def got_headers(h: Any) -> None:
            limits[0] = parse_openai(h)

        body = self.body(request, True)
        chunks = iter_sse(
            self._client, self.name, "/chat/completions", body, self._secrets, got_headers
        )
        with boundary(self.name, self._secrets):
            async for chunk in chunks:
                model = chunk.get("model") or model
                if chunk.get("usage"):
                    usage = _usage(chunk["usage"])
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text:
                        if ttft is None:
                            ttft = (time.perf_counter() - started) * 1000
                        parts.append(text)
                        on_delta(text)
                    for tc in delta.get("tool_calls") or []:
                        if ttft is None:
                            ttft = (time.perf_counter() - started) * 1000
                        acc = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "a": ""})
                        fn = tc.get("function") or {}
                        acc["id"] = tc.get("id") or acc["id"]
                        acc["name"] = fn.get("name") or acc["name"]
                        acc["a"] += fn.get("arguments") or ""
                    finish = choice.get("finish_reason") or finish
        tool_calls = [
            ToolCall(id=c["id"] or f"call_{i}", name=c["name"], args=decode_args(c["a"]))
            for i, c in sorted(calls.items())
        ]
        return Completion(
            output=self._output(request, "".join(parts), tool_calls, finish),
            usage=usage,
            model=model,
            ttft_ms=ttft,
            limits=limits[0],
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _usage(u: Any) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    return Usage(
        input_tokens=int(u.get("prompt_tokens") or 0),
        output_tokens=int(u.get("completion_tokens") or 0),
    )
