"""Anthropic's Messages API (`POST /v1/messages`), streaming included, errors in its shape.

Like Anthropic's API, an unknown top-level field is refused (400 naming it); fields it knows
that have no counterpart here (`top_k`, `top_p`, `thinking`, `service_tier`, ...) are accepted
and have no effect.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from chainyard.contracts import LlmStep, ToolCall

from .core import (
    STEP_ID,
    Answer,
    ApiError,
    Gateway,
    Outcome,
    bad_request,
)
from .http import Sse, StepCall, bearer, convert, json_response, read_json, served_model

IGNORED = frozenset({"top_k", "top_p", "thinking", "service_tier", "container", "mcp_servers"})

# OpenAI's error types (what core raises) as Anthropic's
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
}


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


KNOWN = frozenset(MessagesRequest.__struct_fields__) | IGNORED


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        return content
    raise bad_request(f"{where}: expected a string or a list of content blocks", where)


def _block_text(block: dict[str, Any], where: str) -> str:
    inner = block.get("content", block.get("text", ""))
    if isinstance(inner, list):
        return "".join(_block_text(b, where) for b in inner if isinstance(b, dict))
    if not isinstance(inner, str):
        raise bad_request(f"{where}: expected text", where)
    return inner


def _messages(req: MessagesRequest) -> list[dict[str, Any]]:
    """Anthropic's turns as chainyard messages: tool_use blocks become an assistant's tool
    calls, each tool_result block a `tool` message."""
    out: list[dict[str, Any]] = []
    if req.system:
        system = _blocks(req.system, "system")
        out.append({"role": "system", "content": "".join(_block_text(b, "system") for b in system)})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role: expected 'user' or 'assistant'", f"{where}.role")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for j, b in enumerate(_blocks(m.get("content"), f"{where}.content")):
            at = f"{where}.content[{j}]"
            kind = b.get("type")
            if kind == "text":
                texts.append(_block_text(b, at))
            elif kind == "tool_use" and role == "assistant":
                args = b.get("input") or {}
                if not isinstance(args, dict):
                    raise bad_request(f"{at}.input: expected an object", at)
                calls.append({"id": str(b.get("id", "")), "name": b.get("name"), "args": args})
            elif kind == "tool_result" and role == "user":
                results.append(
                    {
                        "role": "tool",
                        "tool_call_id": str(b.get("tool_use_id", "")),
                        "content": _block_text(b, at),
                    }
                )
            else:
                raise bad_request(f"{at}: unsupported content block {kind!r}", at)
        out += results
        if texts or calls or not results:
            turn: dict[str, Any] = {"role": role, "content": "".join(texts)}
            if calls:
                turn["tool_calls"] = calls
            out.append(turn)
    return out


def _tool_choice(req: MessagesRequest) -> str | None:
    """Anthropic's `tool_choice` as the step's: auto, none, any (-> required), or a tool."""
    choice = req.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return str(kind)
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return str(choice["name"])
    raise bad_request("tool_choice: expected type auto, any, tool or none", "tool_choice")


def _tools(req: MessagesRequest) -> list[dict[str, Any]]:
    specs = []
    for i, t in enumerate(req.tools or []):
        if "input_schema" not in t or "name" not in t:
            raise bad_request(f"tools[{i}]: only custom tools are supported", f"tools[{i}]")
        specs.append(
            {
                "name": t["name"],
                "description": t.get("description", ""),
                "parameters": t["input_schema"],
            }
        )
    return specs


def parse(body: dict[str, Any]) -> MessagesRequest:
    for name in body:
        if name not in KNOWN:
            raise bad_request(f"{name}: Extra inputs are not permitted", name)
    req: MessagesRequest = convert(body, MessagesRequest)
    if not req.messages:
        raise bad_request("messages: at least one message is required", "messages")
    return req


def step_of(req: MessagesRequest) -> LlmStep:
    return convert(
        {
            "id": STEP_ID,
            "model": req.model,
            "messages": _messages(req),
            "tools": _tools(req),
            "params": {
                "max_tokens": req.max_tokens,
                "temperature": req.temperature,
                "stop": req.stop_sequences or [],
                "stream": req.stream,
                "tool_choice": _tool_choice(req) if req.tools else None,
            },
        },
        LlmStep,
    )


# -- answers ---------------------------------------------------------------------------------

_STOP = {"length": "max_tokens", "tool_calls": "tool_use"}


def _stop_reason(ended: Answer) -> str:
    return _STOP.get(ended.output.finish_reason, "end_turn")


def _tool_block(c: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": c.id, "name": c.name, "input": c.args}


def _usage(ended: Outcome) -> dict[str, int]:
    u = getattr(ended, "usage", None)
    return {
        "input_tokens": u.input_tokens if u else 0,
        "output_tokens": u.output_tokens if u else 0,
    }


def message(ended: Answer, asked: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if ended.output.text or not ended.output.tool_calls:
        content.append({"type": "text", "text": ended.output.text})
    content += [_tool_block(c) for c in ended.output.tool_calls]
    return {
        "id": f"msg_{ended.chain_id}",
        "type": "message",
        "role": "assistant",
        "model": served_model(ended, asked),
        "content": content,
        "stop_reason": _stop_reason(ended),
        "stop_sequence": None,
        "usage": _usage(ended),
    }


def error_body(e: ApiError) -> dict[str, Any]:
    kind = _TYPES.get(e.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def error_response(e: ApiError) -> web.Response:
    return json_response(error_body(e), {**e.headers}, status=e.status)


# -- handler ---------------------------------------------------------------------------------


async def messages(gw: Gateway, request: web.Request) -> web.StreamResponse:
    grant = gw.authenticate(bearer(request))
    req = parse(await read_json(request, gw))
    user = (req.metadata or {}).get("user_id")
    meta = {"user": str(user)} if user else {}
    call = await StepCall.admit(gw, request, grant, step_of(req), meta, "msg")

    async def respond(call: StepCall) -> web.StreamResponse:
        if req.stream:
            return await _stream(call, request, req)
        return json_response(message(await call.completed(), req.model), call.headers)

    return await call.answer(request, respond)


async def _stream(call: StepCall, request: web.Request, req: MessagesRequest) -> web.StreamResponse:
    sse = Sse(request, call.headers)

    async def send(event: str, data: dict[str, Any]) -> None:
        await sse.send(msgspec.json.encode({"type": event, **data}), event)

    async def start(model: str) -> None:
        head = {
            "id": f"msg_{call.chain.id}", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }  # fmt: skip
        await send("message_start", {"message": head})
        block = {"type": "text", "text": ""}
        await send("content_block_start", {"index": 0, "content_block": block})

    async def text(piece: str) -> None:
        if not sse.open:
            await start(req.model)
        delta = {"type": "text_delta", "text": piece}
        await send("content_block_delta", {"index": 0, "delta": delta})

    ended = await call.relay(sse, text)
    if isinstance(ended, ApiError):
        await send("error", {"error": error_body(ended)["error"]})
        return await sse.close()
    if not sse.open:
        await start(served_model(ended, req.model))
    await send("content_block_stop", {"index": 0})
    for i, c in enumerate(ended.output.tool_calls, start=1):
        await send(
            "content_block_start", {"index": i, "content_block": {**_tool_block(c), "input": {}}}
        )
        delta = {"type": "input_json_delta", "partial_json": msgspec.json.encode(c.args).decode()}
        await send("content_block_delta", {"index": i, "delta": delta})
        await send("content_block_stop", {"index": i})
    stop = {"stop_reason": _stop_reason(ended), "stop_sequence": None}
    usage = _usage(ended)  # input too: the start could not know it yet
    await send("message_delta", {"delta": stop, "usage": usage})
    await send("message_stop", {})
    return await sse.close()
