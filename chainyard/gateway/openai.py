"""OpenAI's Chat Completions (`POST /v1/chat/completions`) and `GET /v1/models`.

A request becomes a one-step chain on the model or group it names. Unknown fields: OpenAI
refuses an argument it does not know (400, "Unrecognized request argument supplied"), and so
does the gateway; arguments OpenAI knows that have no counterpart here (`seed`, `top_p`,
`user`, `store`, ...) are accepted and have no effect (`IGNORED`).
"""

from __future__ import annotations

import time
from typing import Any, Literal

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
    ANSWERED,
    STEP_ID,
    Answer,
    ApiError,
    Delta,
    Gateway,
    Outcome,
    bad_request,
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


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (other parts are refused, naming them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "input_text") or not isinstance(part.get("text"), str):
                raise bad_request(
                    f"{where}[{i}]: only text content parts are supported (got {kind!r})",
                    f"{where}[{i}]",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}: expected a string or a list of content parts", where)


def _args(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        value = msgspec.json.decode(raw or "{}")
    except (msgspec.DecodeError, TypeError):
        value = None
    if not isinstance(value, dict):
        raise bad_request(f"{where}: the arguments must be a JSON object", where)
    return value


def _message(m: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(f"{where}: expected an object", where)
    role = m.get("role")
    if role in ("system", "developer", "user"):
        return Message(
            role="user" if role == "user" else "system",
            content=_text(m.get("content"), f"{where}.content"),
        )
    if role == "assistant":
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(f"{where}.tool_calls[{j}]: expected a function call", where)
            args = _args(fn.get("arguments"), f"{where}.tool_calls[{j}].function.arguments")
            calls.append(ToolCall(id=str(c.get("id") or f"call_{j}"), name=fn["name"], args=args))
        return Message(
            role="assistant", content=_text(m.get("content"), f"{where}.content"), tool_calls=calls
        )
    if role == "tool":
        return Message(
            role="tool",
            content=_text(m.get("content"), f"{where}.content"),
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


def _tools(req: ChatRequest) -> list[ToolSpec]:
    specs = []
    for i, t in enumerate(req.tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}]: only function tools are supported", f"tools[{i}]")
        fields = {k: fn[k] for k in ("name", "description", "parameters") if k in fn}
        specs.append(convert(fields, ToolSpec))
    return specs


def _params(req: ChatRequest) -> Params:
    fmt: Literal["text", "json"] = "text"
    schema = None
    rf = req.response_format or {"type": "text"}
    kind = rf.get("type")
    if kind == "json_object":
        fmt = "json"
    elif kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise bad_request("response_format.json_schema: expected an object", "response_format")
        fmt, schema = "json", js.get("schema") or {"type": "object"}
    elif kind != "text":
        raise bad_request(f"response_format.type: unsupported {kind!r}", "response_format")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return convert(
        {
            "tool_choice": tool_choice(req.tool_choice) if req.tools else None,
            "max_tokens": req.max_completion_tokens or req.max_tokens,
            "temperature": req.temperature,
            "stop": stop,
            "response_format": fmt,
            "json_schema": schema,
            "stream": bool(req.stream),
        },
        Params,
    )


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


def step_of(req: ChatRequest) -> LlmStep:
    # The parts are built checked; convert checks the step's own fields (its model) and takes
    # the parts as they are, with no round trip through builtins.
    return convert(
        {
            "id": STEP_ID,
            "model": req.model,
            "messages": [_message(m, i) for i, m in enumerate(req.messages)],
            "tools": _tools(req),
            "params": _params(req),
        },
        LlmStep,
    )


def metadata_of(req: ChatRequest) -> dict[str, str]:
    meta = dict(req.metadata or {})
    if req.user:
        meta["user"] = req.user
    return meta


# -- answers ---------------------------------------------------------------------------------

_FINISH = {"length": "length", "tool_calls": "tool_calls", "content_filter": "content_filter"}


def _finish(ended: Answer) -> str:
    return _FINISH.get(ended.output.finish_reason, "stop")


def _arguments(c: ToolCall) -> str:
    if set(c.args) == {"_raw"}:  # what the model wrote, when it was not a JSON object
        return str(c.args["_raw"])
    return msgspec.json.encode(c.args).decode()


def _calls(ended: Answer, indexed: bool) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(ended.output.tool_calls):
        call: dict[str, Any] = {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": _arguments(c)},
        }
        out.append({"index": i, **call} if indexed else call)
    return out


def _usage(ended: Outcome) -> dict[str, int]:
    u = getattr(ended, "usage", None)
    tin, tout = (u.input_tokens, u.output_tokens) if u else (0, 0)
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


async def chat_completions(gw: Gateway, request: web.Request) -> web.StreamResponse:
    grant = gw.authenticate(bearer(request))
    req = parse(await read_json(request, gw))
    call = await StepCall.admit(gw, request, grant, step_of(req), metadata_of(req), "chat")
    created = int(time.time())

    async def respond(call: StepCall) -> web.StreamResponse:
        if req.stream:
            return await _stream(call, request, req, created)
        ended = await call.completed()
        created_s = await call.created_s(created)
        return json_response(completion(ended, req.model, created_s), call.headers)

    return await call.answer(request, respond)


async def _stream(
    call: StepCall, request: web.Request, req: ChatRequest, created: int
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
    ended: Outcome | None = None
    async for item in call.stream():
        if isinstance(item, Delta):
            if not sse.open:
                await opening()
            await sse.send(chunk({"content": item.text}))
        else:
            ended = item
    assert ended is not None
    err = await call.outcome(ended)
    if err is not None:
        if not sse.open:  # nothing sent yet: an ordinary error answer
            raise err
        await sse.send(msgspec.json.encode(error_body(err)))  # as OpenAI does mid-stream
        return await sse.close()
    assert isinstance(ended, ANSWERED)
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
