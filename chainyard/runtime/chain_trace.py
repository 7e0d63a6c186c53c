"""One chain, one trace: the chain's span, and the routing decisions its calls record
(docs/TRACING.md, "How spans are made"; DESIGN-NOTES #28, #30).

A chain outlives any process, so its span cannot stay open in memory: its ids are drawn at
intake and kept in the chain state (`ChainState.trace`, W3C; `parent` only for a sampled chain),
and whichever router replica records the end emits the `chain` span with them
(`tracing.ChainIds`), start = `created_at_ms`, end = `ended_at_ms`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from chainyard.contracts import now_ms

from . import messaging, tracing
from .metrics import metrics

# the chain state keeps W3C trace context whatever OTEL_PROPAGATORS says for the bus
_W3C = TraceContextTextMapPropagator()
_ids = RandomIdGenerator()


def _context(traceparent: str | None, tracestate: str | None = None) -> Context | None:
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = _W3C.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def chain_context(state: Any) -> Context | None:
    """A Context whose span is the chain's (from its state; None when it was not traced)."""
    t = getattr(state, "trace", None)
    return _context(t.get("traceparent"), t.get("tracestate")) if t else None


def trace_id_of(state: Any) -> str | None:
    ctx = chain_context(state)
    return f"{trace.get_current_span(ctx).get_span_context().trace_id:032x}" if ctx else None


def _traceparent(sc: SpanContext) -> dict[str, str]:
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(NonRecordingSpan(sc)))
    return carrier


def begin_chain(outcome: Any) -> Any:
    """Intake: decide whether the new chain is traced, put its trace context in its state
    (`outcome.state`), make the chain's span the parent of what the handler does next, and
    return the outcome. The chain span's parent is the submit message's context (a client's
    `send` span), else it is a root."""
    if tracing.active is None:
        return outcome
    parent = messaging.handler_context()
    psc = trace.get_current_span(parent).get_span_context()
    trace_id = psc.trace_id if psc.is_valid else _ids.generate_trace_id()
    if (sampler := tracing.sampler) is None:  # no sampler to ask: the parent's flag; a root's on
        sampled, trace_state = (psc.trace_flags.sampled if psc.is_valid else True), psc.trace_state
    else:  # the chain's decision, asked once (the sampler's public `should_sample`)
        p = parent if psc.is_valid else None
        r = sampler.should_sample(p, trace_id, "chain", SpanKind.INTERNAL)
        sampled, trace_state = r.decision.is_sampled(), r.trace_state
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    chain = SpanContext(trace_id, _ids.generate_span_id(), False, flags, trace_state)
    ctx = trace.set_span_in_context(NonRecordingSpan(chain), parent)  # baggage kept
    forward: dict[str, str] = {}  # what the chain's first messages carry, formatted once
    propagate.inject(forward, context=ctx)
    # the state keeps W3C context: the propagators' own output when tracecontext is among them
    # (the default), else the W3C propagator's
    t = {k: forward[k] for k in _W3C.fields if k in forward} or _traceparent(chain)
    # `parent` is kept only for a sampled chain: its presence is how `chain_ended` and the
    # handlers of the chain's later messages know, without parsing, that there are spans to make
    if sampled:
        t["parent"] = _traceparent(psc)["traceparent"] if psc.is_valid else ""  # "": a root
    messaging.make_current(ctx, forward=forward, unsampled=not sampled)
    state = msgspec.structs.replace(outcome.state, trace=t)
    if state.status != "running":  # ended at intake (nothing could be routed)
        chain_ended(state)
    outcome.state = state
    return outcome


def adopt_state(state: Any) -> None:
    """A handler that has read the chain's state: a sampled-out chain makes no span (nothing
    is extracted from the message: its headers go on as they came); a message without trace
    context continues the chain's trace."""
    if tracing.active is None or state is None:
        return
    t = getattr(state, "trace", None)
    if not t:
        return
    traced = messaging.handler_traced()
    if "parent" not in t and tracing.drops_unsampled:  # sampled out at intake (begin_chain)
        forward = None
        if not traced:  # a timer: the chain's own headers
            ctx = chain_context(state)
            if ctx is not None:
                forward = {}
                propagate.inject(forward, context=ctx)
        messaging.adopt_unsampled(forward)
    elif not traced and (ctx := chain_context(state)) is not None:
        messaging.make_current(ctx)


def chain_recorded(before: Any, after: Any) -> None:
    """After a compare-and-set: a chain that went from running to ended emits its span."""
    if before is not None and before.status == "running" and after.status != "running":
        chain_ended(after)


def chain_ended(state: Any) -> None:
    """The chain's metrics, and its span, emitted under the ids drawn at intake."""
    if metrics.on:
        dur = ((state.ended_at_ms or now_ms()) - state.created_at_ms) / 1000
        metrics.chain_ended(state.status, dur, state.cost_usd, state.tenant, state.usage)
    tr, t = tracing.active, getattr(state, "trace", None)
    if tr is None or not t or "parent" not in t:  # not traced, or sampled out (begin_chain)
        return
    ctx = chain_context(state)
    sc = trace.get_current_span(ctx).get_span_context() if ctx is not None else None
    if sc is None or not sc.trace_flags.sampled:
        return
    cost: float = 0
    tokens_in = tokens_out = attempts = 0
    for st in state.steps.values():  # cost, usage and attempts in one pass
        cost += st.cost_usd
        tokens_in += st.usage.input_tokens
        tokens_out += st.usage.output_tokens
        attempts += st.attempt
    end_ms = state.ended_at_ms or now_ms()
    attrs: dict[str, Any] = {
        "chainyard.tenant": state.tenant,
        "chainyard.chain.id": state.chain.id,
        "chainyard.chain.outcome": state.status,
        "chainyard.chain.cost_usd": cost,
        "chainyard.chain.input_tokens": tokens_in,
        "chainyard.chain.output_tokens": tokens_out,
        "chainyard.chain.steps": len(state.steps),
        "chainyard.chain.attempts": attempts,
    }
    if state.reason:
        attrs["chainyard.chain.reason"] = state.reason[:500]
    for key, value in state.chain.metadata.items():  # bounded at intake (contracts/_chain.py)
        attrs[f"chainyard.metadata.{key}"] = value
    start = state.created_at_ms * 1_000_000
    parent = _context(t.get("parent"), t.get("tracestate")) or Context()
    token = tracing.forced_ids.set((sc.trace_id, sc.span_id))
    try:
        span = tr.start_span(
            "chain", context=parent, kind=SpanKind.INTERNAL, attributes=attrs, start_time=start
        )
    finally:
        tracing.forced_ids.reset(token)
    if state.status == "failed":
        span.set_attribute("error.type", "chain_failed")
        span.set_status(Status(StatusCode.ERROR, (state.reason or "")[:200]))
    # `ended_at_ms` is the millisecond the end was recorded in, floored: the span ends at that
    # millisecond's last nanosecond, so it never ends before the step span that ended the chain
    span.end(end_time=max(end_ms * 1_000_000 + 999_999, start))


class RouteDecision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the router chose among which candidates, and why: it travels with a sampled
    chain's assignment (header `ROUTE_HEADER`) and the worker's call span records it."""

    reason: str
    candidates: list[str] = []
    tried: list[str] = []
    estimated_cost_usd: float = 0.0


ROUTE_HEADER = "Chainyard-Route"
_route_decoder = msgspec.json.Decoder(RouteDecision)


def route_reason(a: Any, st: Any, n_candidates: int, strategy: str | None) -> str:
    if getattr(a, "hedge", False):
        return "hedge of a slow attempt"
    if st is not None and st.tried:
        why = f" after {st.error.cls}" if st.error is not None else ""
        return f"failover from {st.tried[-1]}{why}"
    if n_candidates <= 1:
        return "only candidate"
    return f"strategy {strategy or 'balanced'}"


def _decision(
    a: Any,
    state: Any,
    candidates: Callable[[], list[str]] | None,
    strategy: str | None,
) -> RouteDecision:
    st = state.steps.get(a.step_id)
    cands = list(candidates()) if candidates is not None else [a.target.deployment]
    strategy = getattr(getattr(a.step, "route", None), "strategy", None) or strategy
    reason = route_reason(a, st, len(cands), strategy)
    return RouteDecision(
        reason=reason,
        candidates=cands if len(cands) > 1 else [],  # one is the choice: `chainyard.deployment`
        tried=st.tried if st else [],
        estimated_cost_usd=float(a.reserved_usd or 0.0),
    )


def route_attributes(header: str | None) -> dict[str, Any]:
    """The call span's routing attributes, from its assignment's `ROUTE_HEADER`."""
    try:
        d = _route_decoder.decode(header or "")
    except msgspec.DecodeError:  # none, or not written by a router: nothing to record
        return {}
    return {f"chainyard.route.{k}": v for k, v in msgspec.structs.asdict(d).items() if v}


async def publish_work(
    js: Any,
    subject: str,
    data: bytes,
    a: Any,
    state: Any,
    candidates: Callable[[], list[str]] | None = None,
    strategy: str | None = None,
) -> Any:
    """Send an assignment under the handler's trace context. A routing decision is no span of
    its own: for a traced chain it goes with the assignment (`ROUTE_HEADER`) and the worker's
    call span, the assignment's consumer, records it (DESIGN-NOTES #30). The choice, pool,
    step and attempt are that span's own attributes already."""
    target = a.target
    if metrics.on:
        metrics.record("routed", 1, pool=target.pool, deployment=target.deployment)
    headers = None
    if tracing.active is not None and not messaging.sampled_out():
        decision = _decision(a, state, candidates, strategy)
        headers = {ROUTE_HEADER: msgspec.json.encode(decision).decode()}
    return await messaging.publish(js, subject, data, a.msg_id, headers=headers)
