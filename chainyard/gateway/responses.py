"""OpenAI's Responses API (`POST /v1/responses`), streaming included, as a one-step chain.

A request runs exactly as a Chat Completions request does (openai.py's messages, tools,
formats, step and `serve_step`; keys, limits, hints, Idempotency-Key and traces from http.py);
only the request's and the answer's shapes differ. The gateway keeps no responses: whatever
needs one stored by the server (`previous_response_id`, `conversation`, `background`, a stored
`prompt`) or a tool OpenAI hosts (`web_search`, `file_search`, ...) is refused with a 400 that
names the parameter and says what to send instead. Arguments OpenAI knows that have no effect
here (`top_p`, `store`, `reasoning`, `include`, ...) are accepted (`IGNORED`), as on the chat
path.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Literal

import msgspec
from aiohttp import web

from chainyard.contracts import LlmStep, Message, ToolCall, ToolSpec

from .core import Answer, ApiError, Gateway, bad_request, usage_tokens
from .http import Sse, StepCall, bearer, convert, served_model
from .openai import (
    Plan,
    arguments_json,
    call_args,
    content_text,
    function_tool,
    llm_step,
    message_of,
    output_format,
    serve_step,
)

# Known to OpenAI, no effect here (each is in OpenAI's CreateResponse; a test checks that).
IGNORED = frozenset(
    {
        "include", "max_tool_calls", "prompt_cache_key", "prompt_cache_options",
        "prompt_cache_retention", "reasoning", "safety_identifier", "service_tier",
        "stream_options", "top_logprobs", "truncation",
    }
)  # fmt: skip

_SEND_INPUT = "send the whole conversation in `input` (earlier output items included)"

# Set (not null, not false), these need state the gateway does not keep or a service OpenAI
# hosts: refused, saying what to do instead.
REFUSED = {
    "previous_response_id": f"the gateway stores no responses to continue from: {_SEND_INPUT}",
    "conversation": f"the gateway stores no conversations: {_SEND_INPUT}",
    "background": "the gateway stores no responses to poll: ask in the foreground (with "
    "`stream: true` for a long answer), or submit a chain to POST /v1/chains and read "
    "GET /v1/chains/{id}",
    "prompt": "stored prompt templates live on OpenAI's platform: send the prompt's text in "
    "`instructions` and `input`",
    "context_management": f"server-side compaction needs stored state: {_SEND_INPUT}",
    "moderation": "OpenAI-hosted moderation is not available here",
}

ROLES = ("user", "assistant", "system", "developer")


class TextParam(msgspec.Struct, kw_only=True):
    format: dict[str, Any] | None = None
    verbosity: str | None = None  # (no effect)


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextParam | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None  # (echoed, no effect: as on the chat path)
    stream: bool | None = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None  # (nothing is stored: the answer says `store: false`)
    parallel_tool_calls: bool | None = None


KNOWN = frozenset(ResponsesRequest.__struct_fields__) | IGNORED | frozenset(REFUSED)


def parse(body: dict[str, Any]) -> ResponsesRequest:
    for name in body:
        if name not in KNOWN:
            raise bad_request(f"Unrecognized request argument supplied: {name}", name)
    for name, why in REFUSED.items():
        if body.get(name) not in (None, False):
            raise bad_request(f"{name}: not supported: {why}", name, "unsupported_parameter")
    req: ResponsesRequest = convert(body, ResponsesRequest)
    if not req.input:
        raise bad_request("input: at least one input item is required", "input")
    return req


# -- the request as a step -------------------------------------------------------------------


def _call(item: dict[str, Any], where: str) -> ToolCall:
    for name in ("call_id", "name"):
        if not isinstance(item.get(name), str):
            raise bad_request(f"{where}.{name}: expected a string", f"{where}.{name}")
    args = call_args(item.get("arguments"), f"{where}.arguments")
    return ToolCall(id=item["call_id"], name=item["name"], args=args)


def _input_message(item: dict[str, Any], where: str) -> Message:
    kind = item.get("type", "message")
    if kind == "message":
        if item.get("role") not in ROLES:
            raise bad_request(f"{where}.role: expected one of {', '.join(ROLES)}", f"{where}.role")
        return message_of(item, where)
    if kind == "function_call":
        return Message(role="assistant", tool_calls=[_call(item, where)])
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad_request(f"{where}.call_id: expected a string", f"{where}.call_id")
        text = content_text(item.get("output"), f"{where}.output")
        return Message(role="tool", content=text, tool_call_id=item["call_id"])
    if kind == "item_reference":
        why = "the gateway stores no items to refer to: send the item itself"
        raise bad_request(f"{where}: item_reference: {why}", where)
    raise bad_request(
        f"{where}.type: unsupported input item {kind!r} (message, function_call and "
        "function_call_output are)",
        f"{where}.type",
    )


def _messages(req: ResponsesRequest) -> list[Message]:
    out = [Message(role="system", content=req.instructions)] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where}: expected an object", where)
        message = _input_message(item, where)
        if item.get("type") == "function_call" and out and out[-1].role == "assistant":
            # the calls of one turn (and its text) are one assistant message, as in chat
            turn = out.pop()
            message = msgspec.structs.replace(turn, tool_calls=turn.tool_calls + message.tool_calls)
        out.append(message)
    return out


def _tools(req: ResponsesRequest) -> list[ToolSpec]:
    specs = []
    for i, t in enumerate(req.tools or []):
        kind = t.get("type")
        if kind != "function":
            raise bad_request(
                f"tools[{i}]: {kind!r} is not supported: only function tools are (tools OpenAI "
                "hosts are not here; define the tool as a function and run it in your app)",
                f"tools[{i}]",
            )
        specs.append(function_tool(t))
    return specs


def _tool_choice(choice: str | dict[str, Any] | None) -> str | None:
    """The Responses API's `tool_choice` as the step's: "auto", "none", "required" or a name."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice  # type: ignore[return-value]
    if isinstance(choice, dict) and choice.get("type") == "function":
        if isinstance(choice.get("name"), str):
            return str(choice["name"])
    raise bad_request(
        "tool_choice: expected 'auto', 'none', 'required' or "
        '{"type": "function", "name": ...} (tools OpenAI hosts are not here)',
        "tool_choice",
    )


def _format(req: ResponsesRequest) -> dict[str, Any]:
    return (req.text.format if req.text else None) or {"type": "text"}


def step_of(req: ResponsesRequest) -> LlmStep:
    fmt = _format(req)
    kind, schema = output_format(fmt.get("type"), fmt, "text.format", "text.format")
    params = {
        "tool_choice": _tool_choice(req.tool_choice) if req.tools else None,
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "response_format": kind,
        "json_schema": schema,
        "stream": bool(req.stream),
    }
    return llm_step(req.model, _messages(req), _tools(req), params)


def metadata_of(req: ResponsesRequest) -> dict[str, str]:
    return {**(req.metadata or {}), **({"user": req.user} if req.user else {})}


# -- answers ---------------------------------------------------------------------------------

Status = Literal["completed", "incomplete", "in_progress", "failed"]
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _echo(req: ResponsesRequest) -> dict[str, Any]:
    """What a response repeats of its request."""
    tools = [
        {**msgspec.to_builtins(function_tool(t)), "type": "function", "strict": t.get("strict")}
        for t in req.tools or []
    ]
    return {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": req.temperature,
        "text": {"format": _format(req)},
        "tool_choice": req.tool_choice or "auto",
        "tools": tools,
        "top_p": req.top_p,
        "truncation": "disabled",
        **({"user": req.user} if req.user else {}),  # (a string when there)
    }


def _head(req: ResponsesRequest, chain_id: str, created: int, model: str) -> dict[str, Any]:
    """The response before it has an answer (`response.created`'s)."""
    return {
        "id": f"resp_{chain_id}",
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "model": model,
        "output": [],
        **_echo(req),
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(chain_id: str, status: Status, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{chain_id}",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _output(ended: Answer, status: Status, with_message: bool) -> list[dict[str, Any]]:
    """A message item (when there is text, no call, or one was streamed already), then one
    item per function call."""
    out = ended.output
    items = []
    if with_message or out.text or not out.tool_calls:
        items.append(_message_item(ended.chain_id, status, [_text_part(out.text)]))
    for i, c in enumerate(out.tool_calls):
        items.append(
            {
                "type": "function_call",
                "id": f"fc_{ended.chain_id}_{i}",
                "call_id": c.id,
                "name": c.name,
                "arguments": arguments_json(c),
                "status": "completed",
            }
        )
    return items


def _usage(ended: Answer) -> dict[str, Any]:
    tin, tout = usage_tokens(ended)
    return {
        "input_tokens": tin,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": tout,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": tin + tout,
    }


def response(
    req: ResponsesRequest, ended: Answer, created: int, with_message: bool = False
) -> dict[str, Any]:
    reason = _INCOMPLETE.get(ended.output.finish_reason)
    status: Status = "incomplete" if reason else "completed"
    return {
        **_head(req, ended.chain_id, created, served_model(ended, req.model)),
        "status": status,
        "incomplete_details": {"reason": reason} if reason else None,
        "output": _output(ended, status, with_message),
        "usage": _usage(ended),
    }


def _failure(e: ApiError) -> dict[str, str]:
    """A response's `error` (its `code` is one of OpenAI's few)."""
    code = {429: "rate_limit_exceeded", 400: "invalid_prompt"}.get(e.status, "server_error")
    return {"code": code, "message": e.message}


# -- handlers --------------------------------------------------------------------------------


def _plan(body: Any) -> Plan:
    req = parse(body)
    return Plan(
        step_of(req),
        metadata_of(req),
        lambda ended, created: response(req, ended, created),
        functools.partial(_stream, req) if req.stream else None,
    )


async def create(gw: Gateway, request: web.Request) -> web.StreamResponse:
    return await serve_step(gw, request, "resp", _plan)


async def stored(gw: Gateway, request: web.Request) -> web.StreamResponse:
    """`GET /v1/responses/{id}` and the rest of the stored-response routes."""
    gw.authenticate(bearer(request))
    chain_id = request.match_info["response_id"].removeprefix("resp_")
    raise ApiError(
        404,
        "the gateway stores no responses (send the whole conversation in `input`); the chain "
        f"that answered is at GET /v1/chains/{chain_id}",
        type="not_found_error",
        code="response_not_stored",
    )


async def _stream(
    req: ResponsesRequest, call: StepCall, request: web.Request, created: int
) -> web.StreamResponse:
    """The Responses API's events, built from the step's text as it comes and its end. Like
    the chat stream, it opens on the first text, so an error before any is an HTTP error."""
    sse = Sse(request, call.headers)
    numbers = itertools.count()
    chain_id = call.chain.id
    message_id = f"msg_{chain_id}"
    at = {"item_id": message_id, "output_index": 0, "content_index": 0}

    async def send(kind: str, **fields: Any) -> None:
        data = {"type": kind, **fields, "sequence_number": next(numbers)}
        await sse.send(msgspec.json.encode(data), kind)

    async def start(model: str, with_message: bool) -> None:
        # An Idempotency-Key's chain exists by its first delta or end: a retry's events carry
        # the time it was created, as its first answer's did (the chat stream's way).
        nonlocal created
        created = await call.created_s(created)
        head = _head(req, chain_id, created, model)
        await send("response.created", response=head)
        await send("response.in_progress", response=head)
        if with_message:
            item = _message_item(chain_id, "in_progress", [])
            await send("response.output_item.added", output_index=0, item=item)
            await send("response.content_part.added", **at, part=_text_part(""))

    async def text(piece: str) -> None:
        if not sse.open:
            await start(req.model, with_message=True)
        await send("response.output_text.delta", **at, delta=piece, logprobs=[])

    ended = await call.relay(sse, text)
    if isinstance(ended, ApiError):
        await send("error", code=ended.code, message=ended.message, param=ended.param)
        failed = {**_head(req, chain_id, created, req.model), "status": "failed"}
        await send("response.failed", response={**failed, "error": _failure(ended)})
        return await sse.close()
    streamed = sse.open  # a message item was added
    final = response(req, ended, created, with_message=streamed)
    if not streamed:
        await start(final["model"], with_message=final["output"][0]["type"] == "message")
    for index, item in enumerate(final["output"]):
        if item["type"] == "message":
            part = item["content"][0]
            await send("response.output_text.done", **at, text=part["text"], logprobs=[])
            await send("response.content_part.done", **at, part=part)
        else:
            added = {**item, "arguments": "", "status": "in_progress"}
            await send("response.output_item.added", output_index=index, item=added)
            where = {"item_id": item["id"], "output_index": index}
            await send("response.function_call_arguments.delta", **where, delta=item["arguments"])
            done = {"name": item["name"], "arguments": item["arguments"]}
            await send("response.function_call_arguments.done", **where, **done)
        await send("response.output_item.done", output_index=index, item=item)
    await send(f"response.{final['status']}", response=final)
    return await sse.close()
