"""Gemini wire format: POST /v1beta/models/{model}:generateContent and
:streamGenerateContent?alt=sse."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from aiohttp import web

from ._core import Answer, Fault, State, Turn, answer, pieces

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool": "STOP"}


def error(state: State, fault: Fault) -> web.Response:
    status = _STATUS.get(fault.status, "INTERNAL" if fault.status >= 500 else "FAILED_PRECONDITION")
    err: dict[str, Any] = {"code": fault.status, "message": fault.message, "status": status}
    if fault.status == 429 and state.config.retry_after_s is not None:
        # Gemini's own way to say when to come back, besides any header.
        err["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{state.config.retry_after_s:g}s",
            }
        ]
    return web.Response(
        status=fault.status,
        body=msgspec.json.encode({"error": err}),
        content_type="application/json",
        # Gemini sends no retry-after headers; RetryInfo above is its only hint.
        headers={k: v for k, v in fault.headers.items() if not k.startswith("retry-after")},
    )


def _turns(body: dict[str, Any]) -> list[Turn]:
    sys_parts = (body.get("systemInstruction") or {}).get("parts") or []
    turns = [Turn(role="system", text=" ".join(p.get("text", "") for p in sys_parts))]
    for c in body["contents"]:
        parts = c.get("parts") or []
        texts = [p["text"] for p in parts if "text" in p]
        results = [p["functionResponse"] for p in parts if "functionResponse" in p]
        if results:
            texts += [msgspec.json.encode(r.get("response")).decode() for r in results]
        role = "tool" if results else ("assistant" if c.get("role") == "model" else "user")
        turns.append(Turn(role=role, text=" ".join(texts)))
    return turns


def _usage(a: Answer) -> dict[str, int]:
    return {
        "promptTokenCount": a.input_tokens,
        "candidatesTokenCount": a.output_tokens,
        "totalTokenCount": a.input_tokens + a.output_tokens,
    }


def _chunk(model: str, parts: list[dict[str, Any]], finish: str | None, a: Answer) -> bytes:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    return msgspec.json.encode(
        {"candidates": [cand], "usageMetadata": _usage(a), "modelVersion": model}
    )


async def handle(state: State, request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        body = None
    model, _, method = request.match_info["target"].partition(":")
    stream = method == "streamGenerateContent"
    state.record(
        "gemini.stream" if stream else "gemini.generate",
        request.path,
        request.query,
        request.headers,
        body,
    )
    fault = await state.gate(request.headers.get("x-goog-api-key"))
    if fault is not None:
        return error(state, fault)
    if method not in ("generateContent", "streamGenerateContent"):
        return error(state, Fault(status=404, message=f"Unknown method {method}.", kind="bad"))
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
        msg = "* GenerateContentRequest.contents: contents is not specified"
        return error(state, Fault(status=400, message=msg, kind="bad"))
    tools = [
        d["name"]
        for t in body.get("tools") or []
        for d in t.get("functionDeclarations") or []
        if "name" in d
    ]
    gen = body.get("generationConfig") or {}
    json_mode = gen.get("responseMimeType") == "application/json"
    schema = gen.get("responseJsonSchema") or gen.get("responseSchema")
    a = answer(_turns(body), tools, gen.get("maxOutputTokens"), json_mode, schema)
    if state.too_long(a.input_tokens):
        msg = (
            f"The input token count ({a.input_tokens}) exceeds the maximum number of tokens "
            f"allowed ({state.config.context_window})."
        )
        return error(state, Fault(status=400, message=msg, kind="context"))
    state.tokens_served += a.input_tokens + a.output_tokens
    call_parts = [{"functionCall": {"name": c.name, "args": c.args}} for c in a.tool_calls]
    if not stream:
        parts = ([{"text": a.text}] if a.text else []) + call_parts
        return web.Response(
            body=_chunk(model, parts, _FINISH[a.finish], a), content_type="application/json"
        )
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    delay = state.config.chunk_delay_ms / 1000
    texts = pieces(a.text)
    # Gemini streams several words per chunk; the last chunk carries the finish reason.
    groups = [[{"text": "".join(texts[i : i + 2])}] for i in range(0, len(texts), 2)]
    if call_parts:
        groups.append(call_parts)  # parallel calls come together, as one chunk of parts
    groups = groups or [[{"text": ""}]]
    for i, parts in enumerate(groups):
        if delay and i:
            await asyncio.sleep(delay)
        last = i == len(groups) - 1
        await resp.write(
            b"data: " + _chunk(model, parts, _FINISH[a.finish] if last else None, a) + b"\r\n\r\n"
        )
    await resp.write_eof()
    return resp
