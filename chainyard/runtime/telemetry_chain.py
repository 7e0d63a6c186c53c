"""One chain, one trace: the chain's span ids are fixed at intake and kept in its state.

A chain outlives any process, so its span cannot stay open in memory. At intake the router
draws the chain span's id, stores `{"traceparent": <chain span>, "parent": <intake process
span>}` in `ChainState.trace`, and hangs the chain's first routing decisions under that id. When
the chain ends (whichever router replica records the end), `end_chain` emits the span with that
same id, start = `created_at_ms`, end = `ended_at_ms`, carrying cost, tokens and outcome.

Routing spans (`route <model>`) wrap the `send cy.work.{pool}` of each assignment and say what
was chosen among which candidates, why, and at what estimated cost.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from chainyard.contracts import now_ms

from . import telemetry as tm
from .telemetry_lite import PARENTS, SpanRef
from .telemetry_metrics import metrics

_CHAIN = tm._FixedCache()  # by tenant and outcome
_KIND: dict[type, str] = {}  # step type -> its tag
_ROUTE = tm._FixedCache()


def chain_context(state: Any) -> SpanContext | None:
    """The chain span's context stored in a chain state (None when it was not traced)."""
    t = getattr(state, "trace", None)
    if not t:
        return None
    return _parse(t.get("traceparent"), t.get("tracestate"))


@functools.lru_cache(maxsize=4096)
def _parse(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """A chain's ids are read from its state at each routing decision and at its end."""
    return tm.parse(traceparent, tracestate)


def trace_id_of(state: Any) -> str | None:
    t = getattr(state, "trace", None)
    ids = tm.parse_ids(t.get("traceparent")) if t else None
    return ids[0] if ids is not None else None


def begin_chain(outcome: Any) -> Any:
    """Intake or replay: put the new chain's trace context in its state (`outcome.state`, set
    on the outcome given, a fresh one: copying it cost more than the rest), and return it."""
    if tm._tracer is None:
        return outcome
    p = tm._parent()
    if type(p) in PARENTS:  # the intake's process span, as a rule
        tid, pid, flags, ts = p._tid, p._sid, 1, p._ts
    else:
        psc = p.get_span_context() if p is not None else trace.INVALID_SPAN_CONTEXT
        tid, flags, ts = f"{psc.trace_id:032x}", psc.trace_flags, psc.trace_state
        pid = f"{psc.span_id:016x}" if psc.is_valid else ""
    sid = tm.new_span_id()
    if pid:
        f = _FLAGS_HEX[flags & 0xFF]
        t = {"traceparent": f"00-{tid}-{sid}-{f}", "parent": f"00-{tid}-{pid}-{f}"}
        if ts:
            t["tracestate"] = ts.to_header()
    else:  # no handler scope and no current span: the chain starts its own trace
        tid, flags, ts = tm.new_trace_id(), 1, None
        t = {"traceparent": f"00-{tid}-{sid}-01"}
    if flags & 1:  # the chain's span, as a parent whose ids the light tracer reads
        tm.adopt(SpanRef(tid, sid, ts), as_chain=True)
    else:
        tm.adopt(
            SpanContext(int(tid, 16), int(sid, 16), True, trace.TraceFlags(flags), ts),
            as_chain=True,
        )
    state = msgspec.structs.replace(outcome.state, trace=t)
    if state.status != "running":  # ended at intake (nothing could be routed)
        chain_ended(None, state)
    outcome.state = state
    return outcome


_FLAGS_HEX = [f"{i:02x}" for i in range(256)]


def adopt_state(state: Any) -> None:
    """A handler whose message had no trace context continues the chain's trace."""
    if tm._tracer is None or state is None:
        return
    s = tm.current_scope()
    if s is not None and s.span is None and s.parent is None:
        tm.adopt(chain_context(state))


def chain_recorded(before: Any, after: Any) -> None:
    """After a compare-and-set: a chain that went from running to ended emits its span."""
    if before is None or before.status != "running" or after.status == "running":
        return
    chain_ended(before, after)


def chain_ended(before: Any, state: Any) -> None:
    if metrics.on:
        dur = ((state.ended_at_ms or now_ms()) - state.created_at_ms) / 1000
        metrics.chain_ended(state.status, dur, state.cost_usd)
    if tm._tracer is not None:
        end_chain(state)


def end_chain(state: Any) -> None:
    """Emit the chain's span under the ids fixed at intake."""
    tr = tm._tracer
    t = getattr(state, "trace", None)
    if tr is None or not t:
        return
    ids = tm.parse_ids(t.get("traceparent"), t.get("tracestate"))  # once a chain: no cache
    if ids is None or not ids[2] & 1:
        return
    tid, sid, _, ts = ids
    pids = tm.parse_ids(t.get("parent"))
    pid = pids[1] if pids is not None else ""
    tenant, status = state.tenant, state.status
    fixed = _CHAIN.get((tenant, status))
    if fixed is None:
        items = {"chainyard.tenant": tenant, "chainyard.chain.outcome": status}
        fixed = _CHAIN.put((tenant, status), "chain", items)
    # state.cost_usd, .usage and the attempts in one pass over the steps
    cost: float = 0
    tokens_in = tokens_out = attempts = 0
    for st in state.steps.values():
        cost += st.cost_usd
        usage = st.usage
        tokens_in += usage.input_tokens
        tokens_out += usage.output_tokens
        attempts += st.attempt
    end_ms = state.ended_at_ms or now_ms()
    attrs = {
        "chainyard.chain.id": state.chain.id,
        "chainyard.chain.cost_usd": cost,
        "chainyard.chain.input_tokens": tokens_in,
        "chainyard.chain.output_tokens": tokens_out,
        "chainyard.chain.steps": len(state.steps),
        "chainyard.chain.attempts": attempts,
        "chainyard.chain.duration_ms": end_ms - state.created_at_ms,
    }
    if state.reason:
        attrs["chainyard.chain.reason"] = state.reason[:500]
    start = state.created_at_ms * 1_000_000
    lite = tm._lite
    if lite is not None:
        span: Any = lite.with_ids(tid, sid, pid, ts, tm.INTERNAL, fixed, attrs, start)
    else:
        token = tm._forced.set((int(tid, 16), int(sid, 16)))
        try:
            span = tr.start_span(
                "chain",
                context=tm.context_of(_parse(t.get("parent"))),
                kind=SpanKind.INTERNAL,
                attributes={**fixed.items, **attrs},
                start_time=start,
            )
        finally:
            tm._forced.reset(token)
    if state.status == "failed":
        span.set_attribute("error.type", "chain_failed")
        span.set_status(Status(StatusCode.ERROR, (state.reason or "")[:200]))
    # `ended_at_ms` is the millisecond the end was recorded in, floored: the span ends at that
    # millisecond's last nanosecond, so it never ends before the step span that ended the chain
    span.end(end_time=max(end_ms * 1_000_000 + 999_999, start))


def _route_parent(state: Any) -> Any:
    """The chain's span at intake / replay (the chain's first steps hang under it), else the
    handler's process span."""
    s = tm.current_scope()
    if s is not None and s.chain_span is not None:
        return s.chain_span
    return tm._parent()


def route_reason(a: Any, st: Any, n_candidates: int, strategy: str | None) -> str:
    if getattr(a, "hedge", False):
        return "hedge of a slow attempt"
    if st is not None and st.tried:
        why = f" after {st.error.cls}" if st.error is not None else ""
        return f"failover from {st.tried[-1]}{why}"
    if n_candidates <= 1:
        return "only candidate"
    return f"strategy {strategy or 'balanced'}"


async def publish_work(
    js: Any,
    subject: str,
    data: bytes,
    a: Any,
    state: Any,
    candidates: Callable[[], list[str]] | None = None,
    strategy: str | None = None,
) -> Any:
    """Send an assignment inside a `route <model>` span that records the decision."""
    target = a.target
    if metrics.on:
        metrics.routed(target.pool, target.deployment)
    tr = tm._tracer
    if tr is None:
        return await js.publish(subject, data, headers={"Nats-Msg-Id": a.msg_id})
    step = a.step
    st = state.steps.get(a.step_id)
    cands = tuple(candidates()) if candidates is not None else (target.deployment,)
    model = getattr(step, "model", None) or getattr(step, "tool", None) or target.model
    strategy = getattr(getattr(step, "route", None), "strategy", None) or strategy
    reason = route_reason(a, st, len(cands), strategy)
    kind = _KIND.get(type(step))
    if kind is None:
        kind = _KIND[type(step)] = getattr(type(step).__struct_config__, "tag", None) or "step"
    # everything but the chain, step and cost repeats from chain to chain: encoded once
    key = (a.tenant, kind, model, cands, target, reason, strategy)
    fixed = _ROUTE.get(key)
    if fixed is None:
        items: dict[str, Any] = {
            "chainyard.tenant": a.tenant,
            "chainyard.step.kind": kind,
            "chainyard.route.model": model,
            "chainyard.route.candidates": cands,
            "chainyard.route.choice": target.deployment,
            "chainyard.route.pool": target.pool,
            "chainyard.route.provider": target.provider,
            "chainyard.route.reason": reason,
        }
        if strategy:
            items["chainyard.route.strategy"] = strategy
        fixed = _ROUTE.put(key, f"route {model}", items)
    attrs: dict[str, Any] = {
        "chainyard.chain.id": a.chain_id,
        "chainyard.step.id": a.step_id,
        "chainyard.step.attempt": a.attempt,
        "chainyard.route.estimated_cost_usd": float(a.reserved_usd or 0.0),
    }
    if st is not None and st.tried:
        attrs["chainyard.route.tried"] = list(st.tried)
    route = tm._start(_route_parent(state), tm.INTERNAL, fixed, attrs)
    try:
        return await tm.publish(
            js,
            subject,
            data,
            a.msg_id,
            parent=route,
            attrs={"chainyard.chain.id": a.chain_id, "chainyard.step.id": a.step_id},
        )
    except BaseException as e:
        tm.record_error(route, e)
        raise
    finally:
        route.end()
