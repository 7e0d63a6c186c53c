"""Messaging spans and trace context on the bus: publish and consume middleware.

`publish` injects the trace context into a JetStream publish's NATS headers with the SDK's
propagators (`opentelemetry.propagate`: W3C `traceparent` / `tracestate` and `baggage` by
default, whatever `OTEL_PROPAGATORS` names). Inside a handler the handler's `process` span (or
the `route` span given as `context`) is the message's producer; elsewhere the publish gets a
`send {destination template}` PRODUCER span of its own.
`consumer` wraps a pull consumer's handler in a `process {template}` CONSUMER span, child of
and linked to the context extracted from the message (header names read in any case, so a Go
client's `Traceparent` works), and makes it current for the handler: the spans and publishes of
the code it calls continue the trace, baggage included. Attributes follow the OpenTelemetry
messaging conventions (`messaging.system = "nats"`, the subject template keeps span names of
low cardinality).

A message without trace context (a timer, a control message from a client without tracing) gets
its process span late: as a child of the chain's own span once the handler has read the chain
state (`adopt`, called by chain_trace.adopt_state), started at the message's arrival.
"""

from __future__ import annotations

import contextvars
import functools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanKind

from . import tracing
from .metrics import metrics
from .tracing import record_error

SYSTEM = "nats"
# ack / nak / term spans: CHAINYARD_TRACE_SETTLE=true (off by default: 3 more spans a step)
settle_spans = os.environ.get("CHAINYARD_TRACE_SETTLE", "").strip().lower() in tracing.TRUE


class _HeaderGetter(Getter[dict[str, str]]):
    """NATS headers as a propagation carrier: names matched in any case."""

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        v = carrier.get(key)
        if v is None:
            for k, val in carrier.items():
                if k.lower() == key:
                    v = val
                    break
            else:
                return None
        return [v]

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


GETTER = _HeaderGetter()

# subject kind -> the tokens after it that vary (a work subject's pool may contain dots)
_VARS = {
    "submit": ("{tenant}",),
    "events": ("{tenant}", "{chain}"),
    "control": ("{tenant}", "{chain}"),
    "timer": ("{tenant}", "{chain}", "{step}"),
    "deadline": ("{tenant}", "{chain}"),
    "delta": ("{tenant}", "{chain}", "{step}"),
    "cancel": ("{tenant}", "{chain}"),
}


@functools.lru_cache(maxsize=1024)
def template(subject: str) -> str:
    """`cy.work.tool.search` -> `cy.work.{pool}`: the destination in span names."""
    parts = subject.split(".")
    if len(parts) < 3:
        return subject
    prefix, kind = parts[0], parts[1]
    if kind == "work":
        return f"{prefix}.work.{{pool}}"
    names = _VARS.get(kind)
    if names is None:
        return subject
    rest = parts[2 + len(names) :]
    if kind == "control" and rest[:1] == ["signal"]:
        rest = ["signal", "{name}"]
    return ".".join((prefix, kind, *names, *rest))


def _attrs(op: str, kind: str, subject: str, msg_id: str | None) -> dict[str, Any]:
    # no `messaging.destination.template`: it is the span's name. Every attribute costs the
    # SDK's validation and the exporter's encoding, a few us each (DESIGN-NOTES #27).
    a: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.name": op,
        "messaging.operation.type": kind,
        "messaging.destination.name": subject,
    }
    if msg_id:
        a["messaging.message.id"] = msg_id
    return a


# -- send ---------------------------------------------------------------------------------------


async def publish(
    js: Any,
    subject: str,
    data: bytes,
    msg_id: str,
    *,
    context: Context | None = None,
) -> Any:
    """`js.publish` with `Nats-Msg-Id` (none when `msg_id` is empty) and the trace context in
    its headers. `context`: the span that produces the message (the router's `route` span);
    from a consumer's handler, its `process` span does. Either way the message gets no span of
    its own: that span is its send (fewer spans a step, the same tree: DESIGN-NOTES #27).
    Elsewhere (a client, a script) the publish gets a `send` span."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else {}
    tr = tracing.active
    if tr is None:
        return await js.publish(subject, data, headers=headers or None)
    if context is None and _scope.get() is not None:
        ensure_span()
        context = otel_context.get_current()
    if context is not None or sampled_out():  # only the context travels on
        propagate.inject(headers, context=context)
        return await js.publish(subject, data, headers=headers)
    a = _attrs("send", "send", subject, msg_id)
    span = tr.start_span(f"send {template(subject)}", kind=SpanKind.PRODUCER, attributes=a)
    propagate.inject(headers, context=trace.set_span_in_context(span))
    try:
        return await js.publish(subject, data, headers=headers)
    except BaseException as e:
        record_error(span, e)
        raise
    finally:
        span.end()


# -- process ------------------------------------------------------------------------------------


class _Scope:
    """A handler's process span (None until it has a parent, see `adopt`) and the contexts it
    made current, detached in reverse order when the handler returns."""

    __slots__ = ("durable", "msg_id", "span", "start_ns", "subject", "tokens")

    def __init__(self, subject: str, msg_id: str | None, durable: str) -> None:
        self.subject = subject
        self.msg_id = msg_id
        self.durable = durable
        self.start_ns = time.time_ns()
        self.span: Span | None = None
        self.tokens: list[Any] = []

    def start(self, parent: Context | None, link: bool) -> Span:
        tr = tracing.active
        assert tr is not None
        if parent is not None and sampled_out(parent):  # nothing to record: carry it on
            self.span = trace.get_current_span(parent)
            self.attach(parent)
            return self.span
        links = None
        if link and parent is not None:
            links = [Link(trace.get_current_span(parent).get_span_context())]
        attrs = _attrs("process", "process", self.subject, self.msg_id)  # only for a span made
        attrs["messaging.consumer.group.name"] = self.durable
        span = self.span = tr.start_span(
            f"process {template(self.subject)}",
            context=parent if parent is not None else otel_context.get_current(),
            kind=SpanKind.CONSUMER,
            attributes=attrs,
            links=links,
            start_time=self.start_ns,
        )
        self.attach(trace.set_span_in_context(span, parent))
        return span

    def attach(self, ctx: Context) -> None:
        self.tokens.append(otel_context.attach(ctx))


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "chainyard_trace_scope", default=None
)


def sampled_out(context: Context | None = None) -> bool:
    """A span made under `context` (default: the current one) would not be recorded: its
    parent was sampled out and the sampler follows the parent (`tracing.follows_parent`)."""
    if not tracing.follows_parent:
        return False
    sc = trace.get_current_span(context).get_span_context()
    return sc.is_valid and not sc.trace_flags.sampled


def ensure_span() -> None:
    """Start the handler's process span, as a new trace, if nothing gave it a parent yet: it
    is the parent of the span about to be made."""
    s = _scope.get()
    if s is not None and s.span is None:
        s.start(None, False)


def current_span() -> Span:
    """The current span, once `ensure_span` has made the handler's process span."""
    ensure_span()
    return trace.get_current_span()


def waiting() -> bool:
    """The handler's message carried no trace context and nothing has given it one yet."""
    s = _scope.get()
    return s is not None and s.span is None


def adopt(parent: Context) -> None:
    """A handler whose message carried no trace context continues `parent` (the chain's)."""
    s = _scope.get()
    if s is not None and s.span is None:
        s.start(parent, False)


def make_current(ctx: Context) -> None:
    """Make `ctx` current for the rest of the handler (intake: the chain's span)."""
    s = _scope.get()
    if s is not None:
        s.attach(ctx)


def consumer(
    handler: Callable[[Any], Awaitable[None]], durable: str, *, pool: str | None = None
) -> Callable[[Any], Awaitable[None]]:
    """Wrap a pull consumer's message handler in a `process` span (and settle spans for its
    ack / nak / term). With `pool`, also count the work in flight (metrics)."""

    async def traced(msg: Any) -> None:
        counted = pool is not None and metrics.on
        if counted:
            metrics.in_flight(pool, 1)  # type: ignore[arg-type]
        try:
            if tracing.active is None:
                await handler(msg)
            else:  # inline, not a nested coroutine: every resume of the handler passes here
                scope, token = _begin(msg, durable)
                try:
                    await handler(msg)
                except BaseException as e:
                    record_error(scope.span or scope.start(None, False), e)
                    raise
                finally:
                    _finish(scope, token)
        finally:
            if counted:
                metrics.in_flight(pool, -1)  # type: ignore[arg-type]

    traced.__name__ = getattr(handler, "__name__", "handler")
    return traced


def _begin(msg: Any, durable: str) -> tuple[_Scope, Any]:
    subject = msg.subject
    headers = msg.headers
    mid = None
    if headers:
        mid = headers.get("Nats-Msg-Id") or GETTER.get(headers, "nats-msg-id")
        mid = mid[0] if isinstance(mid, list) else mid
    scope = _Scope(subject, mid, durable)
    token = _scope.set(scope)
    if headers:
        ctx = propagate.extract(headers, getter=GETTER)
        if trace.get_current_span(ctx).get_span_context().is_valid:
            scope.start(ctx, True)
        elif ctx:  # baggage without a span context: kept for what the handler sends
            scope.attach(ctx)
    if settle_spans:
        for op in ("ack", "nak", "term"):
            orig = getattr(msg, op, None)
            if orig is not None:
                setattr(msg, op, _settle(op, orig, subject, durable))
    return scope, token


def _finish(scope: _Scope, token: Any) -> None:
    span = scope.span or scope.start(None, False)
    for t in reversed(scope.tokens):
        otel_context.detach(t)
    _scope.reset(token)
    span.end()


def _settle(
    op: str, orig: Callable[..., Awaitable[Any]], subject: str, durable: str
) -> Callable[..., Awaitable[Any]]:
    async def settle(*args: Any, **kw: Any) -> Any:
        tr = tracing.active
        if tr is None:
            return await orig(*args, **kw)
        a = _attrs(op, "settle", subject, None)
        a["messaging.consumer.group.name"] = durable
        ensure_span()
        span = tr.start_span(f"{op} {template(subject)}", kind=SpanKind.CLIENT, attributes=a)
        try:
            return await orig(*args, **kw)
        except BaseException as e:
            record_error(span, e)
            raise
        finally:
            span.end()

    return settle
