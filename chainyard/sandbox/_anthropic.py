"""Anthropic Messages wire format: POST /v1/messages (JSON and SSE events)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from aiohttp import web

from ._core import Answer, Fault, State, Turn, answer, args_json, pieces

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_STOP = {"stop": "end_turn", "length": "max_tokens", "tool": "tool_use"}


def _rfc3339(seconds_from_now: float) -> str:
    at = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def _limit_headers(state: State) -> dict[str, str]:
    c = state.config
    req, tok = state.remaining()
    return {
        "anthropic-ratelimit-requests-limit": str(c.limit_requests),
        "anthropic-ratelimit-requests-remaining": str(req),
        "anthropic-ratelimit-requests-reset": _rfc3339(c.reset_requests_s),
        "anthropic-ratelimit-tokens-limit": str(c.limit_tokens),
        "anthropic-ratelimit-tokens-remaining": str(tok),
        "anthropic-ratelimit-tokens-reset": _rfc3339(c.reset_tokens_s),
        "request-id": f"req_{uuid.uuid4().hex[:24]}",
    }


def error(state: State, fault: Fault) -> web.Response:
    typ = _TYPES.get(fault.status, "api_error" if fault.status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": typ, "message": fault.message}}
    return web.Response(
        status=fault.status,
        body=msgspec.json.encode(body),
        content_type="application/json",
        headers={**_limit_headers(state), **fault.headers},
    )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out: list[str] = []
    for b in content if isinstance(content, list) else []:
        if not isinstance(b, dict):
            continue
        if b.get("type") == "text":
            out.append(b.get("text", ""))
        elif b.get("type") == "tool_result":
            out.append(_text(b.get("content", "")))
    return " ".join(out)


def _turns(body: dict[str, Any]) -> list[Turn]:
    turns = [Turn(role="system", text=_text(body.get("system") or ""))]
    for m in body["messages"]:
        content = m.get("content")
        is_result = isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        )
        turns.append(Turn(role="tool" if is_result else str(m.get("role")), text=_text(content)))
    return turns


def _usage(a: Answer, cached: int = 0) -> dict[str, int]:
    # The system prompt is reported as read from the prompt cache, so the three input counts
    # that adapters must add up are all exercised.
    return {
        "input_tokens": a.input_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": a.output_tokens,
    }


async def handle(state: State, request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        body = None
    state.record("anthropic.messages", request.path, request.query, request.headers, body)
    fault = await state.gate(request.headers.get("x-api-key"))
    if fault is not None:
        return error(state, fault)
    if "anthropic-version" not in request.headers:
        msg = "anthropic-version: header is required"
        return error(state, Fault(status=400, message=msg, kind="bad"))
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return error(state, Fault(status=400, message="messages: Field required", kind="bad"))
    if not isinstance(body.get("max_tokens"), int):
        return error(state, Fault(status=400, message="max_tokens: Field required", kind="bad"))
    tools = [t["name"] for t in body.get("tools") or [] if "name" in t]
    turns = _turns(body)
    a = answer(turns, tools, body["max_tokens"])
    cached = len(turns[0].text.split())
    if state.too_long(a.input_tokens):
        msg = f"prompt is too long: {a.input_tokens} tokens > {state.config.context_window} maximum"
        return error(state, Fault(status=400, message=msg, kind="context"))
    state.tokens_served += a.input_tokens + a.output_tokens
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    tool_ids = [f"toolu_{uuid.uuid4().hex[:24]}" for _ in a.tool_calls]
    if body.get("stream"):
        return await _stream(state, request, body, a, msg_id, tool_ids, cached)
    content: list[dict[str, Any]] = []
    if a.text:
        content.append({"type": "text", "text": a.text})
    content += [
        {"type": "tool_use", "id": tool_id, "name": c.name, "input": c.args}
        for tool_id, c in zip(tool_ids, a.tool_calls, strict=True)
    ]
    resp = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": _STOP[a.finish],
        "stop_sequence": None,
        "usage": _usage(a, cached),
    }
    return web.Response(
        body=msgspec.json.encode(resp),
        content_type="application/json",
        headers=_limit_headers(state),
    )


async def _stream(
    state: State,
    request: web.Request,
    body: dict[str, Any],
    a: Answer,
    msg_id: str,
    tool_ids: list[str],
    cached: int,
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            **_limit_headers(state),
        }
    )
    await resp.prepare(request)
    delay = state.config.chunk_delay_ms / 1000

    async def send(event: str, data: dict[str, Any]) -> None:
        await resp.write(
            b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"
        )

    start_usage = {**_usage(a, cached), "output_tokens": 1}
    await send(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": body.get("model"),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": start_usage,
            },
        },
    )
    index = 0
    if a.text:
        await send(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        )
        await send("ping", {"type": "ping"})
        for piece in pieces(a.text):
            if delay:
                await asyncio.sleep(delay)
            await send(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        await send("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    for tool_id, c in zip(tool_ids, a.tool_calls, strict=True):
        await send(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": c.name,
                    "input": {},
                },
            },
        )
        args = args_json(c)
        half = len(args) // 2
        for part in (args[:half], args[half:]):
            await send(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                },
            )
        await send("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    await send(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": _STOP[a.finish], "stop_sequence": None},
            "usage": {"output_tokens": a.output_tokens},
        },
    )
    await send("message_stop", {"type": "message_stop"})
    await resp.write_eof()
    return resp
