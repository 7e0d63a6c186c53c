"""What the HTTP fronts share: the gateway's state, errors, routing hints, idempotent chain
ids, and running a one-step chain.

Both fronts (openai.py, anthropic.py) turn a request into one `LlmStep`, wrap it with
`one_step_chain`, run it with `run_step` (or `stream_step`) and map a chain's end to HTTP with
`end_error`; chains.py serves chainyard's own chain format. app.py is the HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from chainyard.client import Client, NoSuchChain
from chainyard.contracts import (
    BadMessage,
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainEnded,
    ChainFailed,
    ChainRejected,
    ChainTimeout,
    Config,
    LlmStep,
    Route,
    StepCache,
    StepCompleted,
    StepFailed,
    event_decoder,
    new_id,
)
from chainyard.refusals import PermissionDenied, Refusals

STEP_ID = "call"  # the one step of a chain made from a chat/messages request
# As `chainyard watch`: a chain submitted a moment ago may have no state and no event yet
MISSING_AFTER_S = 5.0
DEADLINE_PREFIX = "deadline exceeded"  # how the router starts every past-deadline reason

log = logging.getLogger("chainyard.gateway")


class ApiError(Exception):
    """An error answer: HTTP status, a message for the caller, and OpenAI's `type`/`param`/
    `code` (the Anthropic front maps `type` to its own names). `headers` go on the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, dict(headers or {})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# -- routing hints ---------------------------------------------------------------------------

HINT = "x-chainyard-"


class Hints(msgspec.Struct, frozen=True, kw_only=True):
    """The routing hints of a request's headers, mapped to the chain and step fields."""

    route: Route = Route()
    deadline_ms: int | None = None
    cache: StepCache | None = None


def _number(headers: Mapping[str, str], name: str, kind: type[float] | type[int]) -> Any:
    raw = headers.get(HINT + name)
    if raw is None:
        return None
    try:
        value = kind(raw.strip())
    except ValueError:
        raise bad_request(f"header {HINT}{name}: not a number: {raw!r}", HINT + name) from None
    if value < 0 or (kind is int and value < 1):
        raise bad_request(f"header {HINT}{name}: out of range: {raw!r}", HINT + name)
    return value


def _names(headers: Mapping[str, str], name: str) -> list[str]:
    raw = headers.get(HINT + name, "")
    return [n.strip() for n in raw.split(",") if n.strip()]


NO_HINTS = Hints()


def hints(headers: Mapping[str, str]) -> Hints:
    """`x-chainyard-strategy`, `-max-cost-usd`, `-deadline-ms`, `-prefer`, `-avoid` (comma
    separated pools or deployments), `-hedge-after-ms` and `-cache-ttl-s` (the step's response
    cache, docs/OPERATIONS.md); a malformed one is a 400 naming it."""
    if not any(name.lower().startswith(HINT) for name in headers):
        return NO_HINTS  # most requests: no route to build and validate (docs/BENCH.md)
    strategy = headers.get(HINT + "strategy")
    fields: dict[str, Any] = {
        "strategy": strategy.strip() if strategy else None,
        "max_cost_usd": _number(headers, "max-cost-usd", float),
        "prefer": _names(headers, "prefer"),
        "avoid": _names(headers, "avoid"),
        "hedge_after_ms": _number(headers, "hedge-after-ms", int),
    }
    try:
        route = msgspec.convert(fields, Route)
    except msgspec.ValidationError as e:
        raise bad_request(f"header {HINT}strategy: {e}", HINT + "strategy") from None
    ttl_s = _number(headers, "cache-ttl-s", float)
    try:
        cache = StepCache(ttl_s=ttl_s) if ttl_s is not None else None
        if cache is not None:  # (constructing does not validate: round-trip to check bounds)
            cache = msgspec.convert(msgspec.to_builtins(cache), StepCache)
    except msgspec.ValidationError as e:
        raise bad_request(f"header {HINT}cache-ttl-s: {e}", HINT + "cache-ttl-s") from None
    return Hints(route=route, deadline_ms=_number(headers, "deadline-ms", int), cache=cache)


# -- chain ids -------------------------------------------------------------------------------


def chain_id_for(tenant: str, idempotency_key: str | None, prefix: str) -> str:
    """A fresh id, or with an `Idempotency-Key` one derived from tenant and key alone: every
    gateway replica derives the same id, and the router's per-tenant id dedup runs it once."""
    if not idempotency_key:
        return f"{prefix}-{new_id()}"
    digest = hashlib.sha256(f"{tenant}\0{idempotency_key}".encode()).hexdigest()
    return f"idem-{digest[:40]}"


def one_step_chain(
    step: LlmStep, chain_id: str, hint: Hints, metadata: dict[str, str], default_deadline_ms: int
) -> Chain:
    step = msgspec.structs.replace(step, route=hint.route, cache=hint.cache)
    return Chain(
        id=chain_id,
        steps=[step],
        deadline_ms=hint.deadline_ms or default_deadline_ms,
        metadata=metadata,
    )


# -- a chain's end as HTTP -------------------------------------------------------------------


def _param_of(path: str) -> str | None:
    """`$.steps[0].messages[1].content` -> `messages`: the request field a rejection names."""
    rest = path.removeprefix("$.steps[0].").removeprefix("$.")
    field = rest.split(".", 1)[0].split("[", 1)[0]
    return field or None


Answer = ChainCompleted | StepCompleted
"""A step that answered: its stored answer (`Client.answer`), or its chain's end."""
ANSWERED = (ChainCompleted, StepCompleted)
Outcome = StepCompleted | ChainEnded


def end_error(ended: Outcome) -> ApiError | None:
    """None for an answer; otherwise the error answer a caller should see."""
    if isinstance(ended, ANSWERED):
        return None
    if isinstance(ended, ChainRejected):
        if ended.id_in_use:
            return ApiError(
                409,
                "the Idempotency-Key was used before with a different request",
                code="idempotency_key_reused",
                param="Idempotency-Key",
            )
        first = ended.errors[0] if ended.errors else None
        message = "; ".join(f"{e.path}: {e.message}" for e in ended.errors) or "rejected"
        if first and first.path.endswith(".model"):
            return ApiError(404, message, param="model", code="model_not_found")
        return bad_request(message, _param_of(first.path) if first else None)
    if isinstance(ended, ChainCancelled):
        return ApiError(409, f"the request was cancelled: {ended.reason}", code="cancelled")
    assert isinstance(ended, ChainFailed)
    if ended.reason.startswith(DEADLINE_PREFIX):
        return ApiError(504, ended.reason, type="timeout", code="deadline_exceeded")
    err = ended.error
    if err is not None and err.cls == "fatal" and err.status in (400, 404, 422):
        return bad_request(f"the provider refused the request: {err.message}")
    if err is not None and err.status == 429:
        retry = f"{max(err.retry_after_s or 1.0, 1.0):.0f}"
        return ApiError(
            429, ended.reason, type="rate_limit_error", code="rate_limited",
            headers={"retry-after": retry},
        )  # fmt: skip
    return ApiError(502, ended.reason, type="api_error", code="upstream_failed")


# -- running a step --------------------------------------------------------------------------


async def run_step(
    client: Client, chain: Chain | bytes, timeout_s: float, *, fresh_id: bool = False
) -> Outcome:
    """Run a chain to its end; a one-step chain under an id made for this request (what the
    OpenAI and Anthropic endpoints send without an Idempotency-Key) to its step's answer,
    which is stored before it is seen, so the router's record of the chain's end is not
    waited for (`Client.answer`)."""
    try:
        if fresh_id and isinstance(chain, Chain):
            return await client.answer(chain, timeout=timeout_s)
        return await client.run(chain, timeout=timeout_s, fresh_id=fresh_id)
    except ChainTimeout:
        raise ApiError(
            504, f"no answer within {timeout_s:g} s", type="timeout", code="deadline_exceeded"
        ) from None


class Delta(msgspec.Struct, frozen=True):
    """New text of the step's answer, in order (what was already sent is never sent again)."""

    text: str


async def stream_step(
    client: Client, chain: Chain, timeout_s: float, *, fresh_id: bool = False
) -> AsyncIterator[Delta | Outcome]:
    """The step's text deltas as they come, then the chain's end.

    Deltas are best effort and carry no attempt number, so an attempt that fails after
    streaming (a failover) is followed by a fresh attempt that starts over: only the text
    beyond what was already passed on is yielded. The end carries the whole answer; what the
    deltas missed is yielded from it before the end."""
    queue: asyncio.Queue[Msg | PermissionDenied] = asyncio.Queue()

    async def put(msg: Msg) -> None:
        queue.put_nowait(msg)

    nc = client.nc
    subjects = client.subjects
    listen = (
        subjects.delta(client.tenant, chain.id, STEP_ID),
        subjects.event(client.tenant, chain.id, "step.failed"),
    )
    refused = client.refusals.listening(listen, queue.put_nowait)
    refused.open()
    subs = [await nc.subscribe(subject, cb=put) for subject in listen]
    run = asyncio.ensure_future(run_step(client, chain, timeout_s, fresh_id=fresh_id))
    sent = ""  # passed on so far
    attempt = ""  # the text of the attempt streaming now
    got: asyncio.Future[Msg | PermissionDenied] | None = None
    try:
        while True:
            got = asyncio.ensure_future(queue.get())
            await asyncio.wait({got, run}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                break
            msg = got.result()
            if isinstance(msg, PermissionDenied):
                raise msg
            if msg.subject.startswith(f"{subjects.prefix}.delta."):
                attempt += msg.data.decode(errors="replace")
                if len(attempt) > len(sent):
                    yield Delta(attempt[len(sent) :])
                    sent = attempt
            else:
                with contextlib.suppress(*BadMessage):
                    if isinstance(event_decoder.decode(msg.data), StepFailed):
                        attempt = ""  # the next attempt starts from the beginning
        ended = await run
        final = ended.output.text if isinstance(ended, ANSWERED) else ""
        if len(final) > len(sent) and final.startswith(sent):
            yield Delta(final[len(sent) :])
        yield ended
    finally:
        refused.close()
        run.cancel()
        if got is not None:
            got.cancel()
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def usage_tokens(ended: Outcome) -> tuple[int, int]:
    usage = getattr(ended, "usage", None)
    return (usage.input_tokens, usage.output_tokens) if usage else (0, 0)


# -- keys, limits and the catalog ------------------------------------------------------------


class Grant(Protocol):
    """What a key grants (chainyard/gateway/keys.py's `Grant` is one): its tenant, and the
    models or groups it may use (empty: every one)."""

    @property
    def key_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def models(self) -> tuple[str, ...]: ...


class KeyLookup(Protocol):
    def authenticate(self, raw_key: str) -> Grant | None: ...
    async def stop(self) -> None: ...


class Admission(Protocol):
    async def admit(self, grant: Grant, *, tokens_estimate: int) -> float | None: ...
    def settles(self, grant: Grant) -> bool: ...  # whether `settle` counts anything for it
    async def settle(
        self, grant: Grant, *, tokens: int, cost_usd: float, chain_id: str | None = None
    ) -> None: ...


class StaticGrant(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    tenant: str
    models: tuple[str, ...] = ()


class StaticKeys:
    """Keys given on the command line (`--key KEY=TENANT`), or none: then every request is
    tenant `default` with every model (the open mode of `chainyard dev`)."""

    def __init__(self, keys: Mapping[str, StaticGrant] | None = None) -> None:
        self.keys = dict(keys or {})
        self.open = StaticGrant(key_id="open", tenant="default") if not self.keys else None

    def authenticate(self, raw_key: str) -> Grant | None:
        return self.open or self.keys.get(raw_key)

    async def stop(self) -> None:
        pass


class NoLimits:
    async def admit(self, grant: Grant, *, tokens_estimate: int) -> float | None:
        return None

    def settles(self, grant: Grant) -> bool:
        return False

    async def settle(
        self, grant: Grant, *, tokens: int, cost_usd: float, chain_id: str | None = None
    ) -> None:
        pass


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One name a request may give as `model`: a model, a deployment or a group."""

    id: str
    kind: str  # "model" | "deployment" | "group"
    deployments: tuple[str, ...]


def catalog(config: Config) -> dict[str, ModelEntry]:
    """Every name a step may ask for, as the router resolves them (router/catalog.py)."""
    out: dict[str, ModelEntry] = {}
    for group, names in config.groups.items():
        out[group] = ModelEntry(id=group, kind="group", deployments=tuple(names))
    for d in config.deployments:
        prev = out.get(d.model)
        if prev is None or prev.kind == "model":
            deps = (*prev.deployments, d.name) if prev else (d.name,)
            out[d.model] = ModelEntry(id=d.model, kind="model", deployments=deps)
    for d in config.deployments:
        out.setdefault(d.name, ModelEntry(id=d.name, kind="deployment", deployments=(d.name,)))
    return out


def allowed(grant: Grant, model: str) -> bool:
    return not grant.models or model in grant.models


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    max_body_bytes: int = 4 * 1024 * 1024  # a larger body is refused with 413
    deadline_ms: int = 300_000  # the chain deadline when the request sets none


class Gateway:
    """The state every request handler shares; nothing in it is per request or durable, so
    any number of replicas serve the same NATS."""

    def __init__(
        self,
        nc: NatsClient,
        config: Config,
        *,
        keys: KeyLookup | None = None,
        limits: Admission | None = None,
        settings: Settings | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        """`refusals`: the connection's permission refusals (`Refusals.saw` is its error
        callback), so a request the gateway's NATS user may not serve fails at once."""
        self.nc = nc
        self.refusals = refusals or Refusals()
        self.config = config
        self.topology = config.topology
        self.keys: KeyLookup = keys or StaticKeys()
        self.limits: Admission = limits or NoLimits()
        self.settings = settings or Settings()
        self.models = catalog(config)
        self._clients: dict[str, Client] = {}
        self._chains_kv: KeyValue | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._following: set[asyncio.Task[Any]] = set()  # settle_at_end's, cancelled by close

    def client(self, tenant: str) -> Client:
        """A client bound to one tenant's subjects: a key only ever reaches its own chains."""
        c = self._clients.get(tenant)
        if c is None:
            c = self._clients[tenant] = Client(self.nc, tenant, self.topology, self.refusals)
        return c

    async def chain_state(self, tenant: str, chain_id: str) -> bytes | None:
        """The chain's state as stored (KV `cy_chains`, key `<tenant>.<chain>`), or None."""
        if self._chains_kv is None:
            self._chains_kv = await self.nc.jetstream().key_value(self.topology.chains_kv.bucket)
        try:
            entry = await self._chains_kv.get(f"{tenant}.{chain_id}")
        except KeyNotFoundError:  # (a deleted key too)
            return None
        return entry.value or None

    def authenticate(self, raw_key: str | None) -> Grant:
        grant = self.keys.authenticate(raw_key or "")
        if grant is None:
            why = "invalid API key" if raw_key else "no API key (Authorization: Bearer KEY)"
            raise ApiError(401, why, type="authentication_error", code="invalid_api_key")
        return grant

    def check_model(self, grant: Grant, model: str) -> ModelEntry:
        entry = self.models.get(model)
        if entry is None:
            raise ApiError(
                404,
                f"the model {model!r} does not exist (GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        self.check_allowed(grant, model)
        return entry

    def check_allowed(self, grant: Grant, model: str) -> None:
        """403 for a model, deployment or group the key was not granted."""
        if not allowed(grant, model):
            raise ApiError(
                403,
                f"this key may not use the model {model!r}",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )

    async def admit(self, grant: Grant, tokens_estimate: int) -> None:
        wait_s = await self.limits.admit(grant, tokens_estimate=tokens_estimate)
        if wait_s is not None:
            raise ApiError(
                429,
                f"this key is over its limit; retry in {wait_s:.1f} s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"retry-after": str(max(1, math.ceil(wait_s)))},
            )

    def settle(self, grant: Grant, ended: Outcome, *, shared: bool) -> None:
        """Count what a finished request used against its key's tpm and daily spend, after
        its answer: the compare-and-set writes in KV are not on the answer's path, and a
        failure to count (NATS unreachable) is logged, never made the answer's error. The
        key's next request, on any replica, sees the count a few milliseconds later.
        `shared`: the chain's id was not made for this request (an Idempotency-Key's, a
        posted one), so another request may settle the same chain: it is counted once."""
        if self.limits.settles(grant):
            self._in_background(self._count(grant, ended, shared))

    async def _count(self, grant: Grant, ended: Outcome, shared: bool) -> None:
        tokens_in, tokens_out = usage_tokens(ended)
        cost = getattr(ended, "cost_usd", 0.0)
        once = ended.chain_id if shared else None
        await self.limits.settle(grant, tokens=tokens_in + tokens_out, cost_usd=cost, chain_id=once)

    def settle_at_end(
        self, grant: Grant, chain_id: str, timeout_s: float | None, *, shared: bool
    ) -> None:
        """Count a submitted chain's usage when it ends, whether or not its caller waits for
        it (`POST /v1/chains?wait=false`, or a caller that went away): its events are followed
        in the background for at most `timeout_s` (None: until it ends; a chain without a
        deadline may wait days for a signal). A replica that stops first counts nothing for
        the chains it still follows. `shared`: as for `settle`."""
        if not self.limits.settles(grant):
            return

        async def follow() -> None:
            ended: Any = None
            events = self.client(grant.tenant).watch(chain_id, missing_after=MISSING_AFTER_S)
            with contextlib.suppress(NoSuchChain):  # never submitted: its caller left first
                async with asyncio.timeout(timeout_s):
                    async for ev in events:
                        ended = ev
            if ended is not None:
                await self._count(grant, ended, shared)

        self._following.add(self._in_background(follow()))

    def _in_background(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        """Kept until done (a task nobody holds may be collected) and awaited by `close`."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        self._following.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.warning("gateway: work after an answer failed: %r", e)

    def cancel_if_abandoned(self, tenant: str, chain_id: str, e: BaseException) -> None:
        """Cancel a chain nobody waits for any more: its caller disconnected (the handler is
        cancelled, or a write failed), its wait timed out, or the gateway may not read its
        answer. The handler may itself be being cancelled, so the cancel goes out in a task of
        its own."""
        if isinstance(e, ApiError) and e.status != 504:
            return  # an answer was given: the chain has ended
        if isinstance(e, PermissionDenied):
            if e.subject == self.topology.subjects.submit(tenant).lower():
                return  # the submit itself was refused: nothing runs
            reason = "the gateway may not read its answer (its NATS user lacks a permission)"
        else:
            reason = "nobody waits for it any more (the HTTP client disconnected or timed out)"
        self._in_background(self.client(tenant).cancel(chain_id, reason, timeout=None))

    async def close(self) -> None:
        for task in self._following:  # chains may run for minutes: not waited for
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.keys.stop()


def estimate_tokens(step: LlmStep) -> int:
    """A rough token count of a step for admission (about 4 characters a token, plus what it
    may answer), settled to the real."""
    text = "".join(m.content for m in step.messages)
    return len(text) // 4 + (step.params.max_tokens or 256)
