"""One chain, one trace: the chain's span and a routing span per decision.

A chain outlives any process, so its span cannot stay open in memory. At intake the router
asks the sampler once whether the chain is traced, draws the chain span's id and stores its W3C
context in the chain state (`ChainState.trace`: `traceparent`, `tracestate`, and, only for a
sampled chain, `parent`: the submit's producer, or "" for a root), and the chain's first
routing decisions hang under that id. When the chain ends, whichever router replica records
the end emits the `chain` span with that same id (the tracer's id generator is told it,
`tracing.ChainIds`), start = `created_at_ms`, end = `ended_at_ms`, carrying cost, tokens and
outcome. A handler that has read the state (`adopt_state`) knows from it, without parsing the
message, that a sampled-out chain makes no span; a message without trace context (a timer)
continues the chain's trace.

Routing spans (`route {model}`, PRODUCER) are each assignment's send: the worker's call span
(`chat`, `execute_tool`) is their child. They say what was chosen among which candidates, why,
and at what estimated cost.
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


def _sampled(parent: Context | None, trace_id: int) -> tuple[bool, Any]:
    """The chain's sampling decision, asked once of the provider's sampler (its public
    `should_sample`); with no sampler to ask, the parent's flag (a root is sampled)."""
    s = tracing.sampler
    psc = trace.get_current_span(parent).get_span_context()
    if s is None:
        return (psc.trace_flags.sampled if psc.is_valid else True), psc.trace_state
    result = s.should_sample(parent if psc.is_valid else None, trace_id, "chain", SpanKind.INTERNAL)
    return result.decision.is_sampled(), result.trace_state


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
    sampled, trace_state = _sampled(parent, trace_id)
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    chain = SpanContext(trace_id, _ids.generate_span_id(), False, flags, trace_state)
    t = _traceparent(chain)
    # `parent` is kept only for a sampled chain: its presence is how `end_chain` and the
    # handlers of the chain's later messages know, without parsing, that there are spans to make
    if sampled:
        t["parent"] = _traceparent(psc)["traceparent"] if psc.is_valid else ""  # "": a root
    ctx = trace.set_span_in_context(NonRecordingSpan(chain), parent)  # baggage kept
    forward = None
    if not sampled:  # what the chain's first messages carry, formatted once
        forward = {}
        propagate.inject(forward, context=ctx)
    messaging.make_current(ctx, forward=forward)
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
        messaging.adopt(None, unsampled=True, forward=forward)
    elif not traced:
        messaging.adopt(chain_context(state), unsampled=False, forward=None)


def chain_recorded(before: Any, after: Any) -> None:
    """After a compare-and-set: a chain that went from running to ended emits its span."""
    if before is None or before.status != "running" or after.status == "running":
        return
    chain_ended(after)


def chain_ended(state: Any) -> None:
    if metrics.on:
        dur = ((state.ended_at_ms or now_ms()) - state.created_at_ms) / 1000
        metrics.chain_ended(state.status, dur, state.cost_usd, state.tenant, state.usage)
    if tracing.active is not None:
        end_chain(state)


def end_chain(state: Any) -> None:
    """Emit the chain's span under the ids drawn at intake."""
    tr = tracing.active
    t = getattr(state, "trace", None)
    if tr is None or not t or "parent" not in t:  # not traced, or sampled out (begin_chain)
        return
    ctx = chain_context(state)
    if ctx is None:
        return
    sc = trace.get_current_span(ctx).get_span_context()
    if not sc.trace_flags.sampled:
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
) -> dict[str, Any]:
    target, step = a.target, a.step
    st = state.steps.get(a.step_id)
    cands = tuple(candidates()) if candidates is not None else (target.deployment,)
    strategy = getattr(getattr(step, "route", None), "strategy", None) or strategy
    attrs: dict[str, Any] = {
        "chainyard.step.id": a.step_id,
        "chainyard.step.attempt": a.attempt,
        "chainyard.route.candidates": cands,
        "chainyard.route.choice": target.deployment,
        "chainyard.route.pool": target.pool,
        "chainyard.route.reason": route_reason(a, st, len(cands), strategy),
        "chainyard.route.estimated_cost_usd": float(a.reserved_usd or 0.0),
    }
    if st is not None and st.tried:
        attrs["chainyard.route.tried"] = list(st.tried)
    return attrs


async def publish_work(
    js: Any,
    subject: str,
    data: bytes,
    a: Any,
    state: Any,
    candidates: Callable[[], list[str]] | None = None,
    strategy: str | None = None,
) -> Any:
    """Send an assignment inside a `route {model}` span that records the decision."""
    target = a.target
    if metrics.on:
        metrics.routed(target.pool, target.deployment)
    tr = tracing.active
    if tr is None or messaging.sampled_out():
        return await messaging.publish(js, subject, data, a.msg_id)
    step = a.step
    model = getattr(step, "model", None) or getattr(step, "tool", None) or target.model
    # The assignment's send: the worker's `chat` (or `execute_tool`) span is its child (no
    # `send` span of its own). Its attributes are given once, at the start: under a sampled
    # parent (checked above) the span is kept. The chain and tenant are the trace's (the chain
    # span has them), the model is in the span's name.
    route = tr.start_span(
        f"route {model}",
        context=messaging.handler_context(),
        kind=SpanKind.PRODUCER,
        attributes=_decision(a, state, candidates, strategy),
    )
    try:
        return await messaging.publish(
            js, subject, data, a.msg_id, context=trace.set_span_in_context(route)
        )
    except BaseException as e:
        tracing.record_error(route, e)
        raise
    finally:
        route.end()
