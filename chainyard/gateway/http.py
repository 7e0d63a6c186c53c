"""aiohttp helpers the fronts share: the request's key and body, the trace, SSE, headers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, format_trace_id

from chainyard.runtime import tracing

from .core import ApiError, Gateway, bad_request

CHAIN_ID = "x-chainyard-chain-id"
TRACE_ID = "x-chainyard-trace-id"
SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


def bearer(request: web.Request) -> str | None:
    """The key: `Authorization: Bearer KEY` (OpenAI's SDKs) or `x-api-key` (Anthropic's)."""
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return request.headers.get("x-api-key") or None


async def read_json(request: web.Request, gw: Gateway) -> Any:
    """The body as JSON, at most `max_body_bytes` (413 past it), an object (400 otherwise)."""
    cap = gw.settings.max_body_bytes
    too_big = ApiError(
        413, f"the request body is larger than {cap} bytes", code="request_too_large"
    )
    if request.content_length is not None and request.content_length > cap:
        raise too_big
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > cap:
            raise too_big
    try:
        value = msgspec.json.decode(bytes(body))
    except msgspec.DecodeError as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    return value


def convert(value: Any, kind: type[Any]) -> Any:
    """`value` as `kind`; a mismatch is a 400 naming the field (`$.max_tokens` -> max_tokens)."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as e:
        message, _, at = str(e).rpartition(" - at `")
        path = at.rstrip("`").removeprefix("$.") if message else ""
        where = f"{path}: " if path else ""
        raise bad_request(f"{where}{message or e}", path or None) from None


@contextlib.contextmanager
def server_span(request: web.Request, name: str) -> Iterator[dict[str, str]]:
    """The request's span, continuing the caller's `traceparent`; yields the response headers
    to add (the trace id). With tracing off, the caller's context is still current."""
    parent = propagate.extract(request.headers)
    headers: dict[str, str] = {}
    tr = tracing.active
    if tr is None:
        caller = trace.get_current_span(parent).get_span_context()
        if caller.is_valid:
            headers[TRACE_ID] = format_trace_id(caller.trace_id)
        token = otel_context.attach(parent)
        try:
            yield headers
        finally:
            otel_context.detach(token)
        return
    attrs = {"http.request.method": request.method, "url.path": request.path}
    with tr.start_as_current_span(
        name, context=parent, kind=SpanKind.SERVER, attributes=attrs
    ) as span:
        headers[TRACE_ID] = format_trace_id(span.get_span_context().trace_id)
        yield headers


class Sse:
    """A server-sent-event response, opened on its first event (until then an error can still
    be an ordinary HTTP error)."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        self.open = False

    async def send(self, data: bytes, event: str | None = None) -> None:
        if not self.open:
            await self.response.prepare(self.request)
            self.open = True
        head = f"event: {event}\n".encode() if event else b""
        await self.response.write(head + b"data: " + data + b"\n\n")

    async def close(self) -> web.StreamResponse:
        if not self.open:
            await self.response.prepare(self.request)
        await self.response.write_eof()
        return self.response


def json_response(
    body: Any, headers: dict[str, str] | None = None, status: int = 200
) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )
