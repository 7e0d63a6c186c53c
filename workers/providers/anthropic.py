"""Anthropic Messages API (`POST /v1/messages`).

`base_url` is the host, e.g. "https://api.anthropic.com" (a trailing "/v1" is accepted too).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from chainyard.contracts import Message, Output, ToolCall, Usage
from chainyard.contracts._messages import FinishReason

from ._base import Completion, LlmRequest, OnDelta, ProviderError, RateLimits
from ._errors import boundary, iter_sse, post_json, scrub
from ._http import HttpClient, HttpSettings
from ._ratelimit import parse_anthropic
from .openai import decode_args, json_data

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024  # Anthropic requires max_tokens; the contract makes it optional

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic has no JSON mode; the instruction goes into the system prompt instead.
_JSON_INSTRUCTION = "Respond with a single valid JSON object and nothing else."


def _blocks(m: Message) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if m.content:
        blocks.append({"type": "text", "text": m.content})
    for c in m.tool_calls:
        blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": c.args})
    return blocks


def convert_messages(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """(system, messages): system turns joined into `system`; tool results become user turns
    of tool_result blocks, merged with neighbours because Anthropic wants roles to alternate."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            system.append(m.content)
            continue
        if m.role == "tool":
            role = "user"
            blocks = [
                {"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}
            ]
        else:
            role = m.role
            blocks = _blocks(m) or [{"type": "text", "text": ""}]
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), out


class AnthropicProvider:
    def __init__(
        self,
        base_url: str = "https://api.anthropic.com",
        api_key: str | None = None,
        *,
        timeout_s: float = 600.0,
        http: HttpSettings | None = None,
        version: str = API_VERSION,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        name: str = "anthropic",
        headers: dict[str, str] | None = None,
    ) -> None:
        hdrs = {"content-type": "application/json", "anthropic-version": version, **(headers or {})}
        if api_key:
            hdrs["x-api-key"] = api_key
        self.name = name
        self._secrets = (api_key,) if api_key else ()
        self._default_max_tokens = default_max_tokens
        self._path = "/messages" if base_url.rstrip("/").endswith("/v1") else "/v1/messages"
        self._client = HttpClient(base_url, hdrs, timeout_s, http)

    def __repr__(self) -> str:
        return f"AnthropicProvider(base_url={self._client.base_url!r})"

    def body(self, request: LlmRequest, stream: bool) -> dict[str, Any]:
        p = request.params
        system, messages = convert_messages(request.messages)
        if p.response_format == "json":
            schema = p.json_schema
            extra = _JSON_INSTRUCTION + (
                f" It must match this JSON Schema: {msgspec.json.encode(schema).decode()}"
                if schema
                else ""
            )
            system = f"{system}\n\n{extra}" if system else extra
        body: dict[str, Any] = {
            "model": request.model,
            "max_tokens": p.max_tokens or self._default_max_tokens,
            "messages": messages,
        }
        if system:
            body["system"] = system
        if p.temperature is not None:
            body["temperature"] = min(p.temperature, 1.0)  # Anthropic's range is 0..1
        if p.stop:
            body["stop_sequences"] = list(p.stop)
        if request.tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
            if p.tool_choice and p.tool_choice != "auto":
                body["tool_choice"] = (
                    {"type": "none"} if p.tool_choice == "none"
                    else {"type": "any"} if p.tool_choice == "required"
                    else {"type": "tool", "name": p.tool_choice}
                )  # fmt: skip
        if stream:
            body["stream"] = True
        return body

    async def complete(self, request: LlmRequest, on_delta: OnDelta | None = None) -> Completion:
        if on_delta is not None:
            return await self._stream(request, on_delta)
        data, headers = await post_json(
            self._client, self.name, self._path, self.body(request, False), self._secrets
        )
        with boundary(self.name, self._secrets):
            text: list[str] = []
            calls: list[ToolCall] = []
            for block in data.get("content") or []:
                if block.get("type") == "text":
                    text.append(block.get("text") or "")
                elif block.get("type") == "tool_use":
                    args = block.get("input")
                    calls.append(
                        ToolCall(
                            id=block["id"],
                            name=block["name"],
                            args=args if isinstance(args, dict) else {"_raw": str(args)},
                        )
                    )
            return Completion(
                output=_output(request, "".join(text), calls, data.get("stop_reason")),
                usage=_usage(data.get("usage") or {}),
                model=data.get("model") or request.model,
                limits=parse_anthropic(headers),
            )

    async def _stream(self, request: LlmRequest, on_delta: OnDelta) -> Completion:
        started = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        tools: dict[int, dict[str, str]] = {}  # content-block index -> tool_use being built
        usage: dict[str, int] = {}
        stop: str | None = None
        model = request.model
        limits: list[RateLimits | None] = [None]

        def got_headers(h: Any) -> None:
            limits[0] = parse_anthropic(h)

        body = self.body(request, True)
        events = iter_sse(self._client, self.name, self._path, body, self._secrets, got_headers)
        with boundary(self.name, self._secrets):
            async for ev in events:
                kind = ev.get("type")
                if kind == "content_block_delta":
                    d = ev.get("delta") or {}
                    if d.get("type") == "text_delta" and d.get("text"):
                        if ttft is None:
                            ttft = (time.perf_counter() - started) * 1000
                        parts.append(d["text"])
                        on_delta(d["text"])
                    elif d.get("type") == "input_json_delta":
                        tools[ev["index"]]["a"] += d.get("partial_json") or ""
                elif kind == "content_block_start":
                    b = ev.get("content_block") or {}
                    if b.get("type") == "tool_use":
                        if ttft is None:
                            ttft = (time.perf_counter() - started) * 1000
                        tools[ev["index"]] = {"id": b["id"], "name": b["name"], "a": ""}
                elif kind == "message_start":
                    msg = ev.get("message") or {}
                    model = msg.get("model") or model
                    usage.update(_ints(msg.get("usage")))
                elif kind == "message_delta":
                    stop = (ev.get("delta") or {}).get("stop_reason") or stop
                    usage.update(_ints(ev.get("usage")))  # cumulative counts: later wins
                elif kind == "error":
                    # An error after the 200 (e.g. overloaded mid-stream): retry elsewhere.
                    err = ev.get("error") or {}
                    msg = f"{self.name} stream {err.get('type', 'error')}: {err.get('message', '')}"
                    raise ProviderError("retryable", scrub(msg, self._secrets))
        calls = [
            ToolCall(id=t["id"], name=t["name"], args=decode_args(t["a"]))
            for _, t in sorted(tools.items())
        ]
        return Completion(
            output=_output(request, "".join(parts), calls, stop),
            usage=_usage(usage),
            model=model,
            ttft_ms=ttft,
            limits=limits[0],
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _ints(u: Any) -> dict[str, int]:
    if not isinstance(u, dict):
        return {}
    return {k: int(v) for k, v in u.items() if isinstance(v, int | float)}


def _output(request: LlmRequest, text: str, calls: list[ToolCall], stop: str | None) -> Output:
    reason = _FINISH.get(stop or "", "other")
    data = json_data(text) if request.params.response_format == "json" and text else None
    return Output(text=text, data=data, tool_calls=calls, finish_reason=reason)


def _usage(u: dict[str, Any]) -> Usage:
    # Cached prompt tokens are still prompt tokens: count them as input, as the brief requires.
    return Usage(
        input_tokens=int(u.get("input_tokens") or 0)
        + int(u.get("cache_read_input_tokens") or 0)
        + int(u.get("cache_creation_input_tokens") or 0),
        output_tokens=int(u.get("output_tokens") or 0),
    )
