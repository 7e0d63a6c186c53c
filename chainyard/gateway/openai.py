"""OpenAI's Chat Completions (`POST /v1/chat/completions`) and `GET /v1/models`, and what
the Responses API (responses.py) shares with them: messages, function tools, output formats,
the step, and answering it.

A request becomes a one-step chain on the model or group it names. Unknown fields: OpenAI
refuses an argument it does not know (400, "Unrecognized request argument supplied"), and so
does the gateway; arguments OpenAI knows that have no counterpart here (`seed`, `top_p`,
`user`, `store`, ...) are accepted and have no effect (`IGNORED`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, NamedTuple

import msgspec
from aiohttp import web

from chainyard.contracts import (
    LlmStep,
    Message,
    Params,
    ToolCall,
    ToolSpec,
)

from .core import (
    STEP_ID,
    Answer,
    ApiError,
    Gateway,
    Outcome,
    bad_request,
    usage_tokens,
)
from .http import Sse, StepCall, bearer, convert, json_response, read_json, served_model

# Known to OpenAI, no effect here (each is in OpenAI's CreateChatCompletionRequest; a test
# checks that against the OpenAPI document).
IGNORED = frozenset(
    {
        "frequency_penalty", "presence_penalty", "top_p", "seed", "user", "store",
        "parallel_tool_calls", "service_tier", "logit_bias", "reasoning_effort", "modalities",
        "prediction", "prompt_cache_key", "safety_identifier", "verbosity", "top_logprobs",
        "logprobs", "web_search_options", "audio",
    }
)  # fmt: skip


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    logprobs: bool | None = None


KNOWN = frozenset(ChatRequest.__struct_fields__) | IGNORED
TEXT_PARTS = ("text", "input_text", "output_text")  # (the Responses API's parts too)


def content_text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (other parts are refused, naming them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"{where}[{i}]: only text content parts are supported (got {kind!r})",
                    f"{where}[{i}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}: expected a string or a list of content parts", where)


def call_args(raw: Any, where: str) -> dict[str, Any]:
    """A function call's `arguments` (a JSON object, or the JSON text of one) as a dict."""
    if isinstance(raw, dict):
        return raw
    try:
        value = msgspec.json.decode(raw or "{}")
    except (msgspec.DecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise bad_request(f"{where}: the arguments must be a JSON object", where)
    return value


def message_of(m: Any, where: str) -> Message:
    """One of OpenAI's messages (system, developer, user, assistant, tool) as the step's."""
    if not isinstance(m, dict):
        raise bad_request(f"{where}: expected an object", where)
    role = m.get("role")
    if role in ("system", "developer", "user"):
        return Message(
            role="user" if role == "user" else "system",
            content=content_text(m.get("content"), f"{where}.content"),
        )
    if role == "assistant":
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(f"{where}.tool_calls[{j}]: expected a function call", where)
            args = call_args(fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")
            calls.append(ToolCall(id=str(c.get("id") or f"call_{j}"), name=fn["name"], args=args))
        text = content_text(m.get("content"), f"{where}.content")
        return Message(role="assistant", content=text, tool_calls=calls)
    if role == "tool":
        return Message(
            role="tool",
            content=content_text(m.get("content"), f"{where}.content"),
            tool_call_id=str(m.get("tool_call_id") or ""),
        )
    raise bad_request(f"{where}.role: unsupported role {role!r}", f"{where}.role")


def tool_choice(choice: str | dict[str, Any] | None) -> str | None:
    """OpenAI's `tool_choice` as the step's: "auto", "none", "required" or a function name."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice  # type: ignore[return-value]
    fn = choice.get("function") if isinstance(choice, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return fn["name"]
    raise bad_request(
        "tool_choice: expected 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        "tool_choice",
    )


def function_tool(fn: dict[str, Any]) -> ToolSpec:
    """A function's `name`, `description` and `parameters` (chat nests them under `function`,
    the Responses API does not) as the step's tool."""
    return convert({k: fn[k] for k in ("name", "description", "parameters") if k in fn}, ToolSpec)


def _tools(req: ChatRequest) -> list[ToolSpec]:
    specs = []
    for i, t in enumerate(req.tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}]: only function tools are supported", f"tools[{i}]")
        specs.append(function_tool(fn))
    return specs


Format = tuple[Literal["text", "json"], dict[str, Any] | None]


def output_format(kind: Any, holder: Any, where: str, param: str) -> Format:
    """The step's `response_format` and `json_schema` for a format `kind` (text, json_object,
    json_schema); `holder` is the object with the `schema` (chat's `response_format.
    json_schema`, the Responses API's `text.format` itself), at `where`; `param` names it."""
    if kind == "text":
        return "text", None
    if kind == "json_object":
        return "json", None
    if kind == "json_schema":
        if not isinstance(holder, dict) or not isinstance(holder.get("schema", {}), dict):
            raise bad_request(f"{where}: expected an object with a `schema` object", param)
        return "json", holder.get("schema") or {"type": "object"}
    raise bad_request(f"{param}.type: unsupported {kind!r}", param)


def _params(req: ChatRequest) -> dict[str, Any]:
    rf = req.response_format or {"type": "text"}
    fmt, schema = output_format(
        rf.get("type"), rf.get("json_schema"), "response_format.json_schema", "response_format"
    )
    return {
        "tool_choice": tool_choice(req.tool_choice) if req.tools else None,
        "max_tokens": req.max_completion_tokens or req.max_tokens,
        "temperature": req.temperature,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "response_format": fmt,
        "json_schema": schema,
        "stream": bool(req.stream),
    }


def parse(body: dict[str, Any]) -> ChatRequest:
    for name in body:
        if name not in KNOWN:
            raise bad_request(f"Unrecognized request argument supplied: {name}", name)
    req: ChatRequest = convert(body, ChatRequest)
    if req.n not in (None, 1):
        raise bad_request("n: only n=1 is supported", "n")
    if req.logprobs:
        raise bad_request("logprobs: not supported", "logprobs")
    if not req.messages:
        raise bad_request("messages: at least one message is required", "messages")
    return req


def llm_step(
    model: str, messages: list[Message], tools: list[ToolSpec], params: dict[str, Any]
) -> LlmStep:
    """The request's one step. The parts are built checked; convert checks the step's own
    fields (its model) and takes the parts as they are, with no round trip through builtins."""
    checked = convert(params, Params)
    fields = {"id": STEP_ID, "model": model, "messages": messages, "tools": tools}
    return convert({**fields, "params": checked}, LlmStep)


def step_of(req: ChatRequest) -> LlmStep:
    messages = [message_of(m, f"messages[{i}]") for i, m in enumerate(req.messages)]
    return llm_step(req.model, messages, _tools(req), _params(req))


def metadata_of(req: ChatRequest) -> dict[str, str]:
    meta = dict(req.metadata or {})
    if req.user:
        meta["user"] = req.user
    return meta


# -- answers ---------------------------------------------------------------------------------

_FINISH = {"length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter"}


def _finish(ended: Answer) -> str:
    return _FINISH.get(ended.output.finish_reason, "stop")


def arguments_json(c: ToolCall) -> str:
    if set(c.args) == {"_raw"}:  # what the model wrote, when it was not a JSON object
        return str(c.args["_raw"])
    return msgspec.json.encode(c.args).decode()


def _calls(ended: Answer, indexed: bool) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(ended.output.tool_calls):
        call: dict[str, Any] = {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": arguments_json(c)},
        }
        out.append({"index": i, **call} if indexed else call)
    return out


def _usage(ended: Outcome) -> dict[str, int]:
    tin, tout = usage_tokens(ended)
    return {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout}


def completion(ended: Answer, asked: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": ended.output.text or (None if ended.output.tool_calls else ""),
        "refusal": None,
    }
    if ended.output.tool_calls:
        message["tool_calls"] = _calls(ended, indexed=False)
    return {
        "id": f"chatcmpl-{ended.chain_id}",
        "object": "chat.completion",
        "created": created,
        "model": served_model(ended, asked),
        "choices": [
            {"index": 0, "message": message, "finish_reason": _finish(ended), "logprobs": None}
        ],
        "usage": _usage(ended),
    }


def error_body(e: ApiError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_response(e: ApiError) -> web.Response:
    return json_response(error_body(e), {**e.headers}, status=e.status)


# -- handlers --------------------------------------------------------------------------------


class Plan(NamedTuple):
    """What an OpenAI front makes of a request's body: its step and the chain's metadata, how
    to answer in one piece (`body(answer, created)`), and how to stream, when asked to
    (`stream(call, request, created)`)."""

    step: LlmStep
    metadata: dict[str, str]
    body: Callable[[Answer, int], dict[str, Any]]
    stream: Callable[[StepCall, web.Request, int], Awaitable[web.StreamResponse]] | None


async def serve_step(
    gw: Gateway, request: web.Request, prefix: str, plan_of: Callable[[Any], Plan]
) -> web.StreamResponse:
    """An OpenAI front's request, end to end: the key, the body (`plan_of`), admission, and
    the answer. `created` is the request's second (a keyed retry's answer in one piece gives
    its chain's, as the first answer did)."""
    grant = gw.authenticate(bearer(request))
    plan = plan_of(await read_json(request, gw))
    call = await StepCall.admit(gw, request, grant, plan.step, plan.metadata, prefix)
    created = int(time.time())

    async def respond(call: StepCall) -> web.StreamResponse:
        if plan.stream is not None:
            return await plan.stream(call, request, created)
        ended = await call.completed()
        return json_response(plan.body(ended, await call.created_s(created)), call.headers)

    return await call.answer(request, respond)


def _plan(body: Any) -> Plan:
    req = parse(body)
    return Plan(
        step_of(req),
        metadata_of(req),
        lambda ended, created: completion(ended, req.model, created),
        functools.partial(_stream, req) if req.stream else None,
    )


async def chat_completions(gw: Gateway, request: web.Request) -> web.StreamResponse:
    return await serve_step(gw, request, "chat", _plan)


async def _stream(
    req: ChatRequest, call: StepCall, request: web.Request, created: int
) -> web.StreamResponse:
    sse = Sse(request, call.headers)
    usage_on = bool(req.stream_options and req.stream_options.include_usage)
    base = {
        "id": f"chatcmpl-{call.chain.id}",
        "object": "chat.completion.chunk",
        "created": created,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, model: str = req.model) -> bytes:
        c: dict[str, Any] = {
            **base,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        if usage_on:
            c["usage"] = None
        return msgspec.json.encode(c)

    async def opening(model: str = req.model) -> None:
        # An Idempotency-Key's chain exists by its first delta or end: a retry's chunks carry
        # the time it was created, as its first answer's did.
        base["created"] = await call.created_s(created)
        await sse.send(chunk(first, model=model))

    first = {"role": "assistant", "content": "", "refusal": None}

    async def text(piece: str) -> None:
        if not sse.open:
            await opening()
        await sse.send(chunk({"content": piece}))

    ended = await call.relay(sse, text)
    if isinstance(ended, ApiError):
        await sse.send(msgspec.json.encode(error_body(ended)))  # as OpenAI does mid-stream
        return await sse.close()
    model = served_model(ended, req.model)
    if not sse.open:
        await opening(model)
    if ended.output.tool_calls:
        await sse.send(chunk({"tool_calls": _calls(ended, indexed=True)}, model=model))
    await sse.send(chunk({}, _finish(ended), model=model))
    if usage_on:
        await sse.send(
            msgspec.json.encode({**base, "model": model, "choices": [], "usage": _usage(ended)})
        )
    await sse.send(b"[DONE]")
    return await sse.close()


async def list_models(gw: Gateway, request: web.Request) -> web.Response:
    grant = gw.authenticate(bearer(request))
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": f"chainyard-{entry.kind}"}
        for name, entry in sorted(gw.models.items())
        if not grant.models or name in grant.models
    ]
    return json_response({"object": "list", "data": data})


async def get_model(gw: Gateway, request: web.Request) -> web.Response:
    grant = gw.authenticate(bearer(request))
    name = request.match_info["model"]
    entry = gw.check_model(grant, name)
    return json_response(
        {"id": name, "object": "model", "created": 0, "owned_by": f"chainyard-{entry.kind}"}
    )
