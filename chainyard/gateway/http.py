"""aiohttp helpers the fronts share: the request's key and body, the trace, SSE, headers."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, format_trace_id

from chainyard.contracts import Chain, LlmStep, StepCompleted, state_decoder
from chainyard.runtime import tracing

from .core import (
    ANSWERED,
    Answer,
    ApiError,
    Delta,
    Gateway,
    Grant,
    Outcome,
    bad_request,
    chain_id_for,
    end_error,
    estimate_tokens,
    hints,
    one_step_chain,
    run_step,
    stream_step,
)

CHAIN_ID = "x-chainyard-chain-id"
TRACE_ID = "x-chainyard-trace-id"
CACHE = "x-chainyard-cache"
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
    if request.content_length is not None:
        if request.content_length > cap:
            raise too_big
        body = await request.read()  # (aiohttp refuses past client_max_size while reading)
        if len(body) > cap:  # a compressed body, larger once decompressed
            raise too_big
    else:  # chunked: counted as it comes
        chunks = bytearray()
        async for chunk in request.content.iter_any():
            chunks += chunk
            if len(chunks) > cap:
                raise too_big
        body = bytes(chunks)
    try:
        value = msgspec.json.decode(body)
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
        message = message or str(e)
        path = at.rstrip("`").removeprefix("$") if at != str(e) else ""
        missing = re.match(r"Object missing required field `(.+)`", message)
        if missing:  # the field itself, not the object it is missing from
            path = f"{path}.{missing.group(1)}"
        path = path.removeprefix(".")
        raise bad_request(f"{path}: {message}" if path else message, path or None) from None


@contextlib.contextmanager
def server_span(request: web.Request, name: str) -> Iterator[dict[str, str]]:
    """The request's span, continuing the caller's `traceparent`; yields the response headers
    to add (the trace id). With tracing off, the caller's context is still current."""
    headers: dict[str, str] = {}
    tr = tracing.active
    if tr is None and not any(f in request.headers for f in propagate.get_global_textmap().fields):
        yield headers  # no caller's context and no span: nothing to continue or attach
        return
    parent = propagate.extract(request.headers)
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


class StepCall:
    """One request's one-step chain, checked and admitted: what both fronts run."""

    def __init__(
        self, gw: Gateway, grant: Grant, chain: Chain, fresh_id: bool, replay: bool = False
    ) -> None:
        self.gw, self.grant, self.chain, self.fresh_id = gw, grant, chain, fresh_id
        self.replay = replay  # an Idempotency-Key whose chain exists: its usage was settled
        self.settled = replay  # its usage is counted, or will be
        self.client = gw.client(grant.tenant)
        self.timeout = (chain.deadline_ms or gw.settings.deadline_ms) / 1000 + 5
        self.headers: dict[str, str] = {CHAIN_ID: chain.id}

    @classmethod
    async def admit(
        cls,
        gw: Gateway,
        request: web.Request,
        grant: Grant,
        step: LlmStep,
        metadata: dict[str, str],
        prefix: str,
    ) -> StepCall:
        """The key may use the model, the chain is built (its id from the `Idempotency-Key`
        when there is one, the routing hints from the headers), and the key's limits admit
        it, unless it is a retry of a chain that exists: that runs and spends nothing."""
        gw.check_model(grant, step.model)
        key = request.headers.get("idempotency-key")
        chain_id = chain_id_for(grant.tenant, key, prefix)
        hint = hints(request.headers)
        if step.params.stream:  # a hedge's deltas would interleave with the first attempt's
            route = msgspec.structs.replace(hint.route, hedge_after_ms=None)
            hint = msgspec.structs.replace(hint, route=route)
        chain = one_step_chain(step, chain_id, hint, metadata, gw.settings.deadline_ms)
        replay = key is not None and await gw.chain_state(grant.tenant, chain_id) is not None
        if not replay:
            await gw.admit(grant, estimate_tokens(step))
        return cls(gw, grant, chain, fresh_id=not key, replay=replay)

    async def answer(
        self,
        request: web.Request,
        respond: Callable[[StepCall], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """`respond` inside the request's span; a chain nobody waits for any more (the caller
        went away, the wait timed out) is cancelled, unless it has an Idempotency-Key: then
        the caller's retry picks up the same chain. Either way its usage is counted when it
        ends (a keyed retry, answered from the chain, counts nothing)."""
        with server_span(request, f"{request.method} {request.path}") as trace_headers:
            self.headers.update(trace_headers)
            try:
                return await respond(self)
            except BaseException as e:
                if self.fresh_id:
                    self.gw.cancel_if_abandoned(self.grant.tenant, self.chain.id, e)
                if not self.settled:
                    shared = not self.fresh_id
                    self.gw.settle_at_end(self.grant, self.chain.id, self.timeout, shared=shared)
                raise

    async def created_s(self, now_s: int) -> int:
        """The answer's `created`: `now_s`, or for an Idempotency-Key's chain the time its state
        was created, so a retry's answer is the first one to the second."""
        if self.fresh_id:
            return now_s
        with contextlib.suppress(msgspec.DecodeError):
            if (value := await self.gw.chain_state(self.grant.tenant, self.chain.id)) is not None:
                return state_decoder.decode(value).created_at_ms // 1000
        return now_s

    async def outcome(self, ended: Outcome) -> ApiError | None:
        """Settle the call's usage with the limits (once per chain: not on a replay); the error
        answer of an unsuccessful end."""
        if not self.settled:
            self.settled = True
            self.gw.settle(self.grant, ended, shared=not self.fresh_id)
        if self.chain.steps[0].cache is not None and isinstance(ended, ANSWERED):
            self.headers[CACHE] = "hit" if answered_from_cache(ended) else "miss"
        err = end_error(ended)
        if err is not None:
            err.headers.update(self.headers)
        return err

    async def completed(self) -> Answer:
        """Run the step to its answer; anything else raises its error answer."""
        ended = await run_step(self.client, self.chain, self.timeout, fresh_id=self.fresh_id)
        err = await self.outcome(ended)
        if err is not None:
            raise err
        assert isinstance(ended, ANSWERED)
        return ended

    def stream(self) -> AsyncIterator[Delta | Outcome]:
        return stream_step(self.client, self.chain, self.timeout, fresh_id=self.fresh_id)

    async def relay(self, sse: Sse, on_text: Callable[[str], Awaitable[None]]) -> Answer | ApiError:
        """Run the step streaming: each new piece of its text to `on_text` as it comes, then its
        end: the answer, or its error answer, raised while `sse` has sent nothing (so it is an
        ordinary HTTP error) and returned once it has (for the front to tell in its stream)."""
        ended: Outcome | None = None
        async for item in self.stream():
            if isinstance(item, Delta):
                await on_text(item.text)
            else:
                ended = item
        assert ended is not None
        err = await self.outcome(ended)
        if err is None:
            assert isinstance(ended, ANSWERED)
            return ended
        if not sse.open:
            raise err
        return err


def answered_from_cache(ended: Answer) -> bool:
    if isinstance(ended, StepCompleted):
        return ended.cached
    return any(s.cached for s in ended.steps)


def served_model(ended: Answer, asked: str) -> str:
    """The model that answered (the provider's name), else the one asked for."""
    if isinstance(ended, StepCompleted):
        return ended.target.model or asked
    return next((s.model for s in ended.steps if s.model), asked)
