"""OpenAI Chat Completions wire format: POST /v1/chat/completions (JSON and SSE)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web

from ._core import Answer, Call, Fault, State, Turn, answer, args_json, pieces

_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", None),
    404: ("invalid_request_error", "model_not_found"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}
_FINISH = {"stop": "stop", "length": "length", "tool": "tool_calls"}


def go_duration(seconds: float) -> str:
    # Local copy of the Go formatting: the sandbox must not import workers (layering).
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = f"{int(h)}h" if h else ""
    if h or m:
        out += f"{int(m)}m"
    return out + f"{round(s, 3):g}s"


def _limit_headers(state: State) -> dict[str, str]:
    c = state.config
    req, tok = state.remaining()
    return {
        "x-ratelimit-limit-requests": str(c.limit_requests),
        "x-ratelimit-limit-tokens": str(c.limit_tokens),
        "x-ratelimit-remaining-requests": str(req),
        "x-ratelimit-remaining-tokens": str(tok),
        "x-ratelimit-reset-requests": go_duration(c.reset_requests_s),
        "x-ratelimit-reset-tokens": go_duration(c.reset_tokens_s),
    }


def error(state: State, fault: Fault, code: str | None = None) -> web.Response:
    typ, default_code = _TYPES.get(fault.status, ("server_error", None))
    body = {
        "error": {
            "message": fault.message,
            "type": typ,
            "param": None,
            "code": code or default_code,
        }
    }
    return web.Response(
        status=fault.status,
        body=msgspec.json.encode(body),
        content_type="application/json",
        headers={**_limit_headers(state), **fault.headers},
    )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _turns(messages: list[dict[str, Any]]) -> list[Turn]:
    return [Turn(role=str(m.get("role")), text=_text(m.get("content"))) for m in messages]


def _tool_call(call: Call) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": args_json(call)},
    }


def _usage(a: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": a.input_tokens,
        "completion_tokens": a.output_tokens,
        "total_tokens": a.input_tokens + a.output_tokens,
    }


async def handle(state: State, request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        body = None
    state.record("openai.chat", request.path, request.query, request.headers, body)
    auth = request.headers.get("authorization", "")
    fault = await state.gate(auth[7:] if auth.lower().startswith("bearer ") else None)
    if fault is not None:
        return error(state, fault)
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return error(state, Fault(status=400, message="'messages' is required.", kind="bad"))
    if not body.get("model"):
        return error(state, Fault(status=400, message="'model' is required.", kind="bad"))
    turns = _turns(body["messages"])
    fmt = (body.get("response_format") or {}).get("type")
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    tools = [t["function"]["name"] for t in body.get("tools") or [] if "function" in t]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    a = answer(turns, tools, max_tokens, fmt in ("json_object", "json_schema"), schema)
    if state.too_long(a.input_tokens):
        msg = (
            f"This model's maximum context length is {state.config.context_window} tokens. "
            f"However, your messages resulted in {a.input_tokens} tokens."
        )
        return error(
            state, Fault(status=400, message=msg, kind="context"), "context_length_exceeded"
        )
    state.tokens_served += a.input_tokens + a.output_tokens
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": "fp_sandbox",
    }
    if body.get("stream"):
        return await _stream(state, request, body, head, a)
    message: dict[str, Any] = {"role": "assistant", "content": a.text or None, "refusal": None}
    if a.tool_calls:
        message["tool_calls"] = [_tool_call(c) for c in a.tool_calls]
    resp = {
        **head,
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": _FINISH[a.finish]}
        ],
        "usage": _usage(a),
    }
    return web.Response(
        body=msgspec.json.encode(resp),
        content_type="application/json",
        headers=_limit_headers(state),
    )


async def _stream(
    state: State, request: web.Request, body: dict[str, Any], head: dict[str, Any], a: Answer
) -> web.StreamResponse:
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    resp = web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            **_limit_headers(state),
        }
    )
    await resp.prepare(request)
    delay = state.config.chunk_delay_ms / 1000
    base = {**head, "object": "chat.completion.chunk"}

    async def send(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
        chunk: dict[str, Any] = {**base, "choices": choices}
        if include_usage:
            chunk["usage"] = usage  # null on every chunk but the last, as OpenAI does
        await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    await send(choice({"role": "assistant", "content": ""}))
    for i, c in enumerate(a.tool_calls):
        # Each call: its id and name first, then the arguments in pieces, keyed by `index`.
        call = _tool_call(c)
        args = call["function"]["arguments"]
        first = {
            "index": i,
            "id": call["id"],
            "type": "function",
            "function": {"name": c.name, "arguments": ""},
        }
        await send(choice({"tool_calls": [first]}))
        half = len(args) // 2  # split to exercise reassembly
        for part in (args[:half], args[half:]):
            await send(choice({"tool_calls": [{"index": i, "function": {"arguments": part}}]}))
    for piece in pieces(a.text):
        if delay:
            await asyncio.sleep(delay)
        await send(choice({"content": piece}))
    await send(choice({}, _FINISH[a.finish]))
    if include_usage:
        chunk = {**base, "choices": [], "usage": _usage(a)}
        await resp.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
