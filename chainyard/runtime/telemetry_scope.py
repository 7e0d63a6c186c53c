"""The trace scope of one message handler: its `process` span, and where spans made by the
code it calls belong.

`consumer()` wraps a pull consumer's handler; the scope rides in a context variable, so the
helpers the handler calls (publish, chain and GenAI spans) find their parent without passing it
around. A message without trace headers gets its process span late (`adopt`). Import these
names from `telemetry`, which re-exports them: this module reads that module's state (the tracer
in use) at call time.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY

from . import telemetry as _t
from .telemetry import _SETTLE, CLIENT, CONSUMER, SYSTEM, _FixedCache, _start, record_error
from .telemetry_lite import PARENTS, LiteSpan, SpanRef
from .telemetry_otlp import LIGHT, Fixed
from .telemetry_w3c import (
    TRACEPARENT,
    TRACESTATE,
    context_of,
    extract_ids,
    header,
    parse_ids,
    template,
)
from .telemetry_w3c import new_span_id as _new_id

_now = time.time_ns


class ProcessSpan(LiteSpan):
    """A message's process span that is also its handler's scope: one object per message in
    the common case (the light tracer, a sampled context in the headers). Same API as `Scope`;
    whoever makes one sets `chain_span` (None: a second __init__ call costs more)."""

    __slots__ = ("chain_span",)
    chain_span: Span | None  # the chain's span, once known (intake)

    @property
    def span(self) -> ProcessSpan:
        return self

    @property
    def chain(self) -> Any:
        c = self.chain_span
        return Context({_SPAN_KEY: c}) if c is not None else None

    def ensure(self) -> ProcessSpan:
        return self

    def current(self) -> Span:
        c = self.chain_span
        return c if c is not None else self

    def current_context(self) -> Any:
        return Context({_SPAN_KEY: self.current()})


PARENTS[ProcessSpan] = False
LIGHT.add(ProcessSpan)


class Scope:
    """The process span of the message being handled, started late when it had no context
    (or with an SDK tracer, or an unsampled context)."""

    __slots__ = ("attrs", "chain_span", "fixed", "link", "parent", "span", "start_ns")

    def __init__(self, fixed: Fixed, attrs: dict[str, Any], parent: Any) -> None:
        self.fixed = fixed
        self.attrs = attrs
        # the creation context: (trace id, span id, flags, trace state) from the headers, or a
        # SpanContext given later by `adopt` (then a parent, not a link)
        self.parent = parent
        self.link = parent is not None
        self.start_ns = time.time_ns()
        self.span: Span | None = None
        self.chain_span: Span | None = None  # the chain's span, once known (intake)

    @property
    def chain(self) -> Any:
        """A Context with the chain's span current (None until intake made it)."""
        c = self.chain_span
        return Context({_SPAN_KEY: c}) if c is not None else None

    def ensure(self) -> Span:
        span = self.span
        if span is None:
            p = self.parent
            if type(p) is SpanContext:
                p = (f"{p.trace_id:032x}", f"{p.span_id:016x}", p.trace_flags, p.trace_state)
            lite = _t._lite
            if lite is not None:
                if p is None:
                    span = lite.child(None, CONSUMER, self.fixed, self.attrs, self.start_ns)
                else:
                    span = lite.remote_child(
                        *p, CONSUMER, self.fixed, self.attrs, self.link, self.start_ns
                    )
            else:
                sc = (
                    SpanContext(int(p[0], 16), int(p[1], 16), True, TraceFlags(p[2]), p[3])
                    if p
                    else None
                )
                span = _t._tracer.start_span(
                    self.fixed.name,
                    context=context_of(sc),
                    kind=SpanKind.CONSUMER,
                    attributes={**self.fixed.items, **self.attrs},
                    links=[Link(sc)] if sc is not None and self.link else None,
                    start_time=self.start_ns,
                )
            self.span = span
        return span

    def current(self) -> Span:
        """The parent of spans made now: the chain's span at intake, else the process span."""
        c = self.chain_span
        if c is not None:
            return c
        return self.span if self.span is not None else self.ensure()

    def current_context(self) -> Any:
        """A Context with `current()` as its span."""
        return Context({_SPAN_KEY: self.current()})


_scope: contextvars.ContextVar[Scope | ProcessSpan | None] = contextvars.ContextVar(
    "chainyard_trace_scope", default=None
)
# OTel's current-context variable, set directly around a handler (attach / detach do the same
# through two more calls and a lookup each); None if this OTel version keeps it elsewhere
_otel_cv: contextvars.ContextVar[Any] | None = getattr(
    getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None
)
if not isinstance(_otel_cv, contextvars.ContextVar):
    _otel_cv = None


def current_scope() -> Scope | ProcessSpan | None:
    return _scope.get()


def parent_context() -> Any:
    """Where a span made now belongs: the handler's scope, else the caller's current context."""
    s = _scope.get()
    return s.current_context() if s is not None else otel_context.get_current()


def _parent() -> Any:
    """`parent_context()`'s span, without making the Context (None: a new trace)."""
    s = _scope.get()
    if s is not None:
        return s.current()
    return otel_context.get_current().get(_SPAN_KEY)


def adopt(sc: SpanContext | SpanRef | None, *, as_chain: bool = False) -> None:
    """Give a handler whose message carried no context the chain's context (from its state).

    With `as_chain`, later spans of the handler are children of the chain's span even though
    the process span itself exists (intake: the chain's first steps hang under the chain).
    """
    s = _scope.get()
    if s is None or sc is None:
        return
    if as_chain:
        s.chain_span = sc if type(sc) is SpanRef else NonRecordingSpan(sc)  # type: ignore[arg-type]
    elif s.span is None and s.parent is None:  # (a ProcessSpan had a context: never here)
        s.parent = sc


def consumer(
    handler: Callable[[Any], Awaitable[None]], durable: str, *, pool: str | None = None
) -> Callable[[Any], Awaitable[None]]:
    """Wrap a pull consumer's message handler in a `process` span (and settle spans for its
    ack / nak / term). With `pool`, also count the work in flight (metrics)."""
    from .telemetry_metrics import metrics

    by_tmpl = _FixedCache()  # this consumer's process span attributes, by subject template

    async def traced(msg: Any) -> None:
        counted = pool is not None and metrics.on
        if counted:
            metrics.in_flight(pool, 1)  # type: ignore[arg-type]
        try:
            if _t._tracer is None:
                await handler(msg)
            else:  # inline, not a nested coroutine: every resume of the handler passes here
                scope, token, otel_token = _begin(msg, durable, by_tmpl)
                try:
                    await handler(msg)
                except BaseException as e:
                    record_error(scope.ensure(), e)
                    raise
                finally:
                    _finish(scope, token, otel_token)
        finally:
            if counted:
                metrics.in_flight(pool, -1)  # type: ignore[arg-type]

    traced.__name__ = getattr(handler, "__name__", "handler")
    return traced


def _begin(msg: Any, durable: str, by_tmpl: _FixedCache) -> tuple[Scope | ProcessSpan, Any, Any]:
    subject = msg.subject
    tmpl = template(subject)
    fixed = by_tmpl.get(tmpl) or by_tmpl.messaging(
        "process", tmpl, **{"messaging.consumer.group.name": durable}
    )
    attrs = {"messaging.destination.name": subject}
    headers = msg.headers
    parent = None
    if headers:
        mid = headers.get("Nats-Msg-Id") or header(headers, "nats-msg-id")
        if mid:
            attrs["messaging.message.id"] = mid
        tp = headers.get(TRACEPARENT)  # as written by chainyard, else in any case
        parent = parse_ids(tp, headers.get(TRACESTATE)) if tp else extract_ids(headers)
    lite = _t._lite
    scope: Scope | ProcessSpan
    span: Any = None
    if parent is not None and lite is not None and parent[2] & 1:  # the common case
        tid, pid, _, ts = parent
        scope = span = ProcessSpan(
            lite, fixed.name, tid, _new_id(), pid, True, ts, CONSUMER, fixed, attrs, True, _now()
        )
        scope.chain_span = None
    else:
        scope = Scope(fixed, attrs, parent)
        if parent is not None:  # started now (else once the handler adopts a context)
            span = scope.ensure()
    token = _scope.set(scope)
    if _t.settle_spans:
        _settle_spans(msg, scope, tmpl, subject, durable)
    otel_token = None
    if span is not None:  # let user code see it as current
        ctx = Context({_SPAN_KEY: span})
        otel_token = _otel_cv.set(ctx) if _otel_cv is not None else otel_context.attach(ctx)
    return scope, token, otel_token


def _finish(scope: Scope | ProcessSpan, token: Any, otel_token: Any) -> None:
    if otel_token is not None:
        if _otel_cv is not None:
            _otel_cv.reset(otel_token)
        else:
            otel_context.detach(otel_token)
    _scope.reset(token)
    if type(scope) is ProcessSpan:
        scope.end()
    else:
        (scope.span or scope.ensure()).end()


def _settle_spans(
    msg: Any, scope: Scope | ProcessSpan, tmpl: str, subject: str, durable: str
) -> None:
    for op in ("ack", "nak", "term"):
        orig = getattr(msg, op, None)
        if orig is not None:
            setattr(msg, op, _settle(op, orig, scope, tmpl, subject, durable))


def _settle(
    op: str,
    orig: Callable[..., Awaitable[Any]],
    scope: Scope | ProcessSpan,
    tmpl: str,
    subject: str,
    durable: str,
) -> Callable[..., Awaitable[Any]]:
    async def settle(*args: Any, **kw: Any) -> Any:
        if _t._tracer is None:
            return await orig(*args, **kw)
        fixed = _SETTLE.get((op, tmpl, durable))
        if fixed is None:
            fixed = _SETTLE.put(
                (op, tmpl, durable),
                f"{op} {tmpl}",
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.name": op,
                    "messaging.operation.type": "settle",
                    "messaging.destination.template": tmpl,
                    "messaging.consumer.group.name": durable,
                },
            )
        span = _start(scope.current(), CLIENT, fixed, {"messaging.destination.name": subject})
        try:
            return await orig(*args, **kw)
        except BaseException as e:
            record_error(span, e)
            raise
        finally:
            span.end()

    return settle
