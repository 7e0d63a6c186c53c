"""chainyard's own chain API over HTTP: what a NATS client can do, an HTTP-only client can.

- `POST /v1/chains`: a chain in the published JSON format (contracts/schema/chain.json); one
  without `id` gets a fresh one. Answers with the terminal event (200; a rejection 400, an id
  used by another chain 409), or with `Accept: text/event-stream` the chain's events as SSE to
  its end, or with `?wait=false` at once (202, `{"id": ...}`).
- `GET /v1/chains/{id}`: the chain's state (KV `cy_chains`); `/events`: its events to its end
  (SSE, else JSON lines), `?deltas=true` with the streamed text.
- `POST /v1/chains/{id}/cancel` (`{"reason": ...}`) and `/signal/{name}` (the body is the
  signal's JSON data): the router's answer, 200 accepted or 409 refused.

Every one is scoped to the key's tenant: another tenant's chain of the same id is not seen.
A posted chain is held to the key's model grant and limits as a chat request is, and its usage
is counted when it ends, whoever waits for it (`Gateway.settle_at_end`).
Errors are in OpenAI's error shape.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web

from chainyard.client import NoSuchChain
from chainyard.contracts import (
    Chain,
    ChainRejected,
    ControlAccepted,
    ControlRejected,
    LlmStep,
    chain_decoder,
    encode,
    new_id,
)

from .core import (
    MISSING_AFTER_S,
    ApiError,
    Gateway,
    Grant,
    bad_request,
    estimate_tokens,
    run_step,
)
from .http import CHAIN_ID, Sse, bearer, json_response, read_json, server_span

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TRUE = ("1", "true", "yes")


def _path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not _ID.match(value):
        raise bad_request(f"{name}: expected 1-64 of A-Z a-z 0-9 _ -, got {value!r}", name)
    return value


def _wants_sse(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _ended_status(ended: Any) -> int:
    if isinstance(ended, ChainRejected):
        return 409 if ended.id_in_use else 400
    return 200


async def _admit(gw: Gateway, grant: Grant, data: bytes, replay: bool) -> Chain | None:
    """The key may use every model the chain's steps name, and its limits admit the chain
    unless it is a `replay` (its id exists: nothing runs again), as for a chat request: the
    chain, or None for one the router will reject (nothing runs)."""
    try:
        chain = chain_decoder.decode(data)
    except msgspec.DecodeError:  # (a ValidationError is one)
        chain = None
    llm_steps = [s for s in chain.steps if isinstance(s, LlmStep)] if chain else []
    for step in llm_steps:
        gw.check_allowed(grant, step.model)
    if not replay:
        await gw.admit(grant, sum(estimate_tokens(s) for s in llm_steps))
    return chain


async def submit(gw: Gateway, request: web.Request) -> web.StreamResponse:
    grant = gw.authenticate(bearer(request))
    body = await read_json(request, gw)
    fresh_id = "id" not in body
    if fresh_id:
        body["id"] = new_id()
    chain_id = str(body["id"])
    data = msgspec.json.encode(body)
    # a chain of this id exists (a retry): not admitted again, its usage not counted again
    replay = (
        not fresh_id
        and _ID.match(chain_id) is not None  # (another is rejected by the router)
        and await gw.chain_state(grant.tenant, chain_id) is not None
    )
    chain = await _admit(gw, grant, data, replay)
    client = gw.client(grant.tenant)
    deadline = body.get("deadline_ms")  # (the router judges it; a wrong one is rejected)
    wait_ms = deadline if isinstance(deadline, int) and deadline > 0 else gw.settings.deadline_ms
    timeout = wait_ms / 1000 + 5
    if chain is not None and not replay:  # followed for as long as the chain may run
        follow_s = timeout if chain.deadline_ms else None
        gw.settle_at_end(grant, chain_id, follow_s, shared=not fresh_id)
    with server_span(request, "POST /v1/chains") as headers:
        headers[CHAIN_ID] = chain_id
        if request.query.get("wait", "true").lower() not in _TRUE:
            await client.submit(data)
            return json_response({"id": chain_id}, headers, status=202)
        if not _wants_sse(request):
            ended = await run_step(client, data, timeout, fresh_id=fresh_id)
            headers[CHAIN_ID] = ended.chain_id  # (a chain the router cannot read gets another)
            return json_response(msgspec.to_builtins(ended), headers, _ended_status(ended))
        await client.submit(data)
        return await _events(gw, request, grant.tenant, chain_id, headers, deltas=False)


async def state(gw: Gateway, request: web.Request) -> web.Response:
    grant = gw.authenticate(bearer(request))
    chain_id = _path_id(request, "chain_id")
    value = await gw.chain_state(grant.tenant, chain_id)
    if value is None:
        raise ApiError(404, f"no chain {chain_id!r}", type="not_found_error", code="not_found")
    return web.Response(body=value, content_type="application/json")


async def events(gw: Gateway, request: web.Request) -> web.StreamResponse:
    grant = gw.authenticate(bearer(request))
    chain_id = _path_id(request, "chain_id")
    deltas = request.query.get("deltas", "").lower() in _TRUE
    headers = {CHAIN_ID: chain_id}
    return await _events(gw, request, grant.tenant, chain_id, headers, deltas, MISSING_AFTER_S)


async def _events(
    gw: Gateway,
    request: web.Request,
    tenant: str,
    chain_id: str,
    headers: dict[str, str],
    deltas: bool,
    missing_after: float | None = None,
) -> web.StreamResponse:
    """The chain's events (history, then live) to its end: SSE (`event: <type>`), else JSON
    lines; a streamed delta is `{"type": "delta", "step_id", "text"}`. With `missing_after`, a
    chain that shows no state and no event within that long is a 404 (before any answer)."""
    watch = gw.client(tenant).watch(chain_id, deltas=deltas, missing_after=missing_after)
    try:
        first = await anext(watch)
    except NoSuchChain:
        raise ApiError(
            404, f"no chain {chain_id!r}", type="not_found_error", code="not_found"
        ) from None
    sse = _wants_sse(request)
    if sse:
        out = Sse(request, headers)
    else:
        resp = web.StreamResponse(headers={**headers, "content-type": "application/x-ndjson"})
        await resp.prepare(request)
    async for ev in _chained(first, watch):
        if isinstance(ev, tuple):
            kind, data = (
                "delta",
                msgspec.json.encode({"type": "delta", "step_id": ev[0], "text": ev[1]}),
            )
        else:
            kind, data = str(ev.__struct_config__.tag), encode(ev)
        if sse:
            await out.send(data, kind)
        else:
            await resp.write(data + b"\n")
    if sse:
        return await out.close()
    await resp.write_eof()
    return resp


async def _chained(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


def _answer(answer: ControlAccepted | ControlRejected | None) -> web.Response:
    status = 200 if isinstance(answer, ControlAccepted) else 409
    return json_response(msgspec.to_builtins(answer), status=status)


async def cancel(gw: Gateway, request: web.Request) -> web.Response:
    grant = gw.authenticate(bearer(request))
    chain_id = _path_id(request, "chain_id")
    body = await read_json(request, gw) if request.can_read_body else {}
    reason = str(body.get("reason") or "cancelled over HTTP")
    return _answer(await gw.client(grant.tenant).cancel(chain_id, reason))


async def signal(gw: Gateway, request: web.Request) -> web.Response:
    grant = gw.authenticate(bearer(request))
    chain_id = _path_id(request, "chain_id")
    name = _path_id(request, "name")
    raw = await request.read() if request.can_read_body else b""
    if len(raw) > gw.settings.max_body_bytes:
        raise ApiError(413, "the signal's data is too large", code="request_too_large")
    try:
        data = msgspec.json.decode(raw) if raw.strip() else None
    except msgspec.DecodeError as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    return _answer(await gw.client(grant.tenant).signal(chain_id, name, data))
