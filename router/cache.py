"""The shared response cache: one NATS KV bucket that every router replica reads and writes.

A step opts in with `"cache": {"ttl_s": N}`. Before its assignment goes out, the router looks
up the step's request (references resolved) and, on a hit, publishes the `step.completed` a
worker would have (same message id, `cached: true`, cost 0, `saved_usd` = what the stored call
cost) instead; the engine then handles it like any result. A worker's `step.completed` for such
a step is stored after its transition is recorded. See docs/DESIGN-NOTES.md #25.

The key is a SHA-256 of the canonical JSON (sorted keys) of the model or group the step asked
for, its messages, tools and params (`stream` left out: a streamed answer is kept whole), and
the tenant unless `[cache] shared_across_tenants`. Expiry: the bucket's max age bounds every
entry (`[cache] max_ttl_s`) and a lookup refuses an entry older than its own `ttl_s` or the
writer's. Size: the bucket keeps `max_bytes` (the oldest entries go first) and an answer whose
entry exceeds `max_entry_bytes` is not stored.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import msgspec
from nats.errors import Error as NatsError
from nats.js.api import DiscardPolicy
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from chainyard.contracts import (
    CacheConfig,
    ChainState,
    KvDef,
    LlmStep,
    Output,
    StepCompleted,
    Target,
    Usage,
    encode,
    now_ms,
)
from chainyard.runtime import messaging, tracing
from chainyard.runtime.metrics import metrics
from chainyard.runtime.nats import Publisher, ensure_kv, retry_api

log = logging.getLogger("chainyard.router.cache")
KEY_VERSION = 1  # part of every key: a change of the key's recipe starts a fresh cache
CACHE_WORKER = "cache"  # the `worker` of a step.completed answered from the cache


class CacheEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What the bucket keeps per request: the answer and what it cost."""

    output: Output
    usage: Usage
    cost_usd: float
    target: Target
    stored_at_ms: int
    ttl_s: float


_entry_decoder = msgspec.json.Decoder(CacheEntry)
_canonical = msgspec.json.Encoder(order="sorted")


def cached_step(step: object) -> LlmStep | None:
    """The step, if it is an LLM step that opted in to the cache."""
    if isinstance(step, LlmStep) and step.cache is not None and step.loop is None:
        return step
    return None


def request_key(step: LlmStep, tenant: str, shared: bool) -> str:
    """The cache key of a step's request (references already resolved)."""
    params = msgspec.structs.replace(step.params, stream=False)
    body = _canonical.encode(
        {
            "v": KEY_VERSION,
            "tenant": None if shared else tenant,
            "model": step.model,
            "messages": step.messages,
            "tools": step.tools,
            "params": params,
        }
    )
    return hashlib.sha256(body).hexdigest()


def bucket_name(prefix: str) -> str:
    return f"{prefix}_cache".replace("-", "_")


class ResponseCache:
    def __init__(self, kv: KeyValue, config: CacheConfig) -> None:
        self.kv = kv
        self.config = config

    @classmethod
    async def open(cls, js: Any, prefix: str, config: CacheConfig, replicas: int) -> ResponseCache:
        """Open the bucket, creating it (safe from many replicas at once) with its limits."""
        bucket = bucket_name(prefix)
        kvdef = KvDef(bucket=bucket, ttl_s=config.max_ttl_s)

        async def discard_old() -> None:
            # A full cache drops its oldest answers; a KV bucket refuses new ones by default.
            info = await js.stream_info(f"KV_{bucket}")
            if info.config.discard != DiscardPolicy.OLD:
                info.config.discard = DiscardPolicy.OLD
                await js.update_stream(info.config)

        kv = await retry_api(lambda: ensure_kv(js, kvdef, replicas, config.max_bytes))
        await retry_api(discard_old)  # both wait out a leader election, as every service does
        return cls(kv, config)

    def key(self, step: LlmStep, tenant: str) -> str:
        return request_key(step, tenant, self.config.shared_across_tenants)

    async def lookup(self, step: LlmStep, tenant: str) -> CacheEntry | None:
        """A live entry for the request, or None (absent, expired, unreadable)."""
        assert step.cache is not None
        try:
            got = await self.kv.get(self.key(step, tenant))
        except KeyNotFoundError:
            return None
        except (NatsError, TimeoutError) as e:  # no leader, say: the call goes to a provider
            log.warning("cache lookup failed (%r); calling the provider", e)
            return None
        if not got.value:
            return None
        try:
            entry = _entry_decoder.decode(got.value)
        except msgspec.DecodeError:
            return None
        age_ms = now_ms() - entry.stored_at_ms
        if age_ms > min(step.cache.ttl_s, entry.ttl_s) * 1000:
            return None
        return entry

    async def store(self, step: LlmStep, tenant: str, ev: StepCompleted) -> str:
        """Keep a worker's answer; returns what happened (the metric's `outcome`)."""
        assert step.cache is not None
        entry = CacheEntry(
            output=ev.output,
            usage=ev.usage,
            cost_usd=ev.cost_usd,
            target=ev.target,
            stored_at_ms=now_ms(),
            ttl_s=min(step.cache.ttl_s, self.config.max_ttl_s),
        )
        data = encode(entry)
        if len(data) > self.config.max_entry_bytes:
            return "too_large"
        try:
            await self.kv.put(self.key(step, tenant), data)
        except (NatsError, TimeoutError) as e:
            log.warning("cache store failed (%r); the answer is not kept", e)
            return "error"
        return "stored"


def hit_event(
    state: ChainState, step_id: str, attempt: int, target: Target, dispatched_at_ms: int,
    entry: CacheEntry, latency_ms: float,
) -> StepCompleted:  # fmt: skip
    """The step.completed of a hit: the stored answer, no tokens spent, nothing paid."""
    t = now_ms()
    return StepCompleted(
        chain_id=state.chain.id,
        step_id=step_id,
        attempt=attempt,
        tenant=state.tenant,
        output=entry.output,
        cost_usd=0.0,
        target=msgspec.structs.replace(target, model=entry.target.model),
        worker=CACHE_WORKER,
        dispatched_at_ms=dispatched_at_ms,
        started_at_ms=t,
        latency_ms=latency_ms,
        cached=True,
        saved_usd=entry.cost_usd,
    )


async def publish_hit(
    publisher: Publisher, subject: str, delta_subject: str | None, nc: Any, ev: StepCompleted,
    model: str,
) -> None:  # fmt: skip
    """Publish a hit's event in a `cache {model}` span (attribute `chainyard.cache.hit`); a
    streaming step first gets its whole answer as one delta."""
    if delta_subject is not None and ev.output.text:
        await nc.publish(delta_subject, ev.output.text.encode())
    if metrics.on:
        where = {"pool": ev.target.pool, "deployment": ev.target.deployment}
        metrics.record("cache_hits", 1, **where)
        metrics.record("cache_saved", ev.saved_usd, **where)
    msg_id = f"{ev.tenant}.{ev.chain_id}.{ev.step_id}.{ev.attempt}.step.completed"
    tr = tracing.active
    if tr is None or messaging.sampled_out():
        await messaging.publish(publisher, subject, encode(ev), msg_id)
        return
    span = tr.start_span(
        f"cache {model}",
        context=messaging.handler_context(),
        kind=SpanKind.INTERNAL,
        attributes={
            "chainyard.tenant": ev.tenant,
            "chainyard.chain.id": ev.chain_id,
            "chainyard.step.id": ev.step_id,
            "chainyard.step.attempt": ev.attempt,
            "chainyard.cache.hit": True,
            "chainyard.cache.saved_usd": ev.saved_usd,
            "chainyard.route.choice": ev.target.deployment,
        },
    )
    try:
        await messaging.publish(
            publisher, subject, encode(ev), msg_id, context=trace.set_span_in_context(span)
        )
    except BaseException as e:
        tracing.record_error(span, e)
        raise
    finally:
        span.end()
