"""Trace context on the bus: publish and consume middleware (docs/TRACING.md, "How spans are
made"; DESIGN-NOTES #27, #28). `publish` puts the handler's context in a message's headers, or
outside a handler makes a `send` span; `consumer` makes the message's context the handler's,
extracted on first need, and makes no span: the handler's work is the span. A message without
trace context (a timer) continues the chain's trace once the handler has read the chain state
(chain_trace.adopt_state).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind

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
            v = next((val for k, val in carrier.items() if k.lower() == key), None)
        return None if v is None else [v]

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
    headers: dict[str, str] | None = None,
) -> Any:
    """`js.publish` with `Nats-Msg-Id` (none when `msg_id` is empty), `headers`, and the trace
    context. `context`: the span that produces the message (the router's `cache` span); inside
    a consumer's handler, the handler's context (`_Scope.carry`). Either way the message gets
    no span of its own. Elsewhere (a client, a script) the publish gets a `send` span."""
    headers = dict(headers or ())
    if msg_id:
        headers["Nats-Msg-Id"] = msg_id
    tr = tracing.active
    if tr is None:
        return await js.publish(subject, data, headers=headers or None)
    if context is not None:
        propagate.inject(headers, context=context)
    elif (scope := _scope.get()) is not None:
        scope.carry(headers)
    elif sampled_out():  # a sampled-out caller's context travels on, no span
        propagate.inject(headers)
    else:
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
    return await js.publish(subject, data, headers=headers)


# -- consume ------------------------------------------------------------------------------------


class _Scope:
    """One handled message's trace context: its trace headers (`carrier`, the fields the
    propagators read), extracted on first need (`resolve`), and the contexts made current for
    the handler, detached in reverse order when it returns. `unsampled`: nothing to record; then
    `forward` is what its messages carry. Contexts are made current only in the handler's own
    `task`; its other tasks (the router's `asyncio.gather`) read `context` (DESIGN-NOTES #28)."""

    __slots__ = (
        "carrier",
        "context",
        "durable",
        "forward",
        "msg",
        "resolved",
        "task",
        "tokens",
        "unsampled",
    )

    def __init__(self, msg: Any, durable: str) -> None:
        self.msg = msg
        self.durable = durable
        self.resolved = False
        self.unsampled = False
        self.forward: dict[str, str] | None = None
        self.tokens: list[Any] = []
        self.context: Context | None = None  # the last made current for the handler
        self.task = asyncio.current_task()
        self.carrier: dict[str, str] = {}
        eager = False  # fields beyond the W3C trace context (baggage...): the handler's at once
        if headers := msg.headers:
            textmap = propagate.get_global_textmap()
            for k, v in headers.items():
                if low := _propagated(textmap, k):
                    self.carrier[k] = v
                    eager = eager or low not in _TRACE_CONTEXT
        if eager:
            self.resolve()

    def resolve(self) -> None:
        """Make the message's context current for the rest of the handler (once)."""
        if self.resolved:
            return
        self.resolved = True
        if not self.carrier:
            return
        ctx = propagate.extract(self.carrier, getter=GETTER)
        sc = trace.get_current_span(ctx).get_span_context()
        if sc.is_valid and not sc.trace_flags.sampled and tracing.drops_unsampled:
            self.unsampled = True
            self.forward = self.carrier
        if ctx:
            self.attach(ctx)

    def attach(self, ctx: Context) -> None:
        self.resolved = True
        self.context = ctx
        if asyncio.current_task() is self.task:
            self.tokens.append(otel_context.attach(ctx))

    def current(self) -> Context:
        """The context the handler's spans continue, in any of its tasks."""
        ctx = otel_context.get_current()
        if self.context is None or trace.get_current_span(ctx).get_span_context().is_valid:
            return ctx
        return self.context

    def carry(self, headers: dict[str, str]) -> None:
        """Put the handler's trace context in an outgoing message's `headers`: those already
        formatted for it (`forward`), or the message's own trace headers as received while
        nothing else was made current (nothing to parse or format), else what the propagators
        write for the current context."""
        fwd = self.forward
        if fwd is not None and (self.unsampled or otel_context.get_current() is self.context):
            headers.update(fwd)
        elif not self.resolved:
            headers.update(self.carrier)
        else:
            propagate.inject(headers, context=self.current())


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "chainyard_trace_scope", default=None
)


# the W3C trace context's own fields: a message carrying only these is extracted lazily
_TRACE_CONTEXT = frozenset(("traceparent", "tracestate"))


@functools.lru_cache(maxsize=256)
def _propagated(textmap: Any, name: str) -> str | None:
    """`name` in lower case when the propagators read it (their public `fields`), else None.
    Cached: a message has a few names."""
    low = name.lower()
    return low if low in {f.lower() for f in textmap.fields} else None


def sampled_out() -> bool:
    """A span made now (under the handler's context, else the current one) would not be
    recorded: its parent was sampled out and the sampler drops such children."""
    if not tracing.drops_unsampled:
        return False
    s = _scope.get()
    if s is not None:
        s.resolve()
        if s.unsampled:
            return True
    sc = trace.get_current_span(s.current() if s is not None else None).get_span_context()
    return sc.is_valid and not sc.trace_flags.sampled


def handler_context() -> Context:
    """The context a span made now continues: the handled message's (extracted on first need)
    or whatever the handler made current since."""
    s = _scope.get()
    if s is None:
        return otel_context.get_current()
    s.resolve()
    return s.current()


def header(name: str) -> str | None:
    """A header of the message being handled (None outside a handler)."""
    s = _scope.get()
    return s.msg.headers.get(name) if s is not None and s.msg.headers else None


def consumer_attributes() -> dict[str, Any]:
    """The messaging attributes of the message being handled (`{}` outside a handler): a
    handler's span (`chat`, `execute_tool`) is the consumer's `process` span too."""
    s = _scope.get()
    if s is None:
        return {}
    mid = GETTER.get(s.msg.headers or {}, "nats-msg-id")
    a = _attrs("process", "process", s.msg.subject, mid[0] if mid else None)
    a["messaging.consumer.group.name"] = s.durable
    return a


def handler_traced() -> bool:
    """In a handler whose message carried trace headers (else the chain's context is adopted)."""
    s = _scope.get()
    return s is not None and bool(s.carrier)


def adopt_unsampled(forward: dict[str, str] | None) -> None:
    """The handler's chain is known to be sampled out: nothing to extract or record; its
    messages carry `forward`, else the handled message's own trace headers."""
    s = _scope.get()
    if s is not None:
        s.resolved = s.unsampled = True
        if s.forward is None:
            s.forward = forward if forward is not None else s.carrier or None


def make_current(
    ctx: Context, *, forward: dict[str, str] | None = None, unsampled: bool = False
) -> None:
    """Make `ctx` current for the rest of the handler (intake: the chain's span; the worker:
    its `chat` span, which the step's event then carries). `forward`: `ctx`'s headers, already
    formatted; `unsampled`: the chain is sampled out (nothing to record under `ctx`)."""
    s = _scope.get()
    if s is None:
        return
    s.attach(ctx)
    s.forward = forward
    s.unsampled = unsampled and forward is not None and tracing.drops_unsampled


def consumer(
    handler: Callable[[Any], Awaitable[None]], durable: str, *, pool: str | None = None
) -> Callable[[Any], Awaitable[None]]:
    """Wrap a pull consumer's message handler in the message's trace context (and settle
    spans for its ack / nak / term). With `pool`, also count the work in flight (metrics)."""

    async def traced(msg: Any) -> None:
        counted = pool is not None and metrics.on
        if counted:
            metrics.record("in_flight", 1, pool=pool)  # type: ignore[arg-type]
        try:
            if tracing.active is None:
                await handler(msg)
            else:  # inline, not a nested coroutine: every resume of the handler passes here
                scope = _Scope(msg, durable)
                token = _scope.set(scope)
                if settle_spans:
                    _wrap_settle(msg, durable)
                try:
                    await handler(msg)
                finally:
                    for t in reversed(scope.tokens):
                        otel_context.detach(t)
                    _scope.reset(token)
        finally:
            if counted:
                metrics.record("in_flight", -1, pool=pool)  # type: ignore[arg-type]

    traced.__name__ = getattr(handler, "__name__", "handler")
    return traced


def _wrap_settle(msg: Any, durable: str) -> None:
    for op in ("ack", "nak", "term"):
        if (orig := getattr(msg, op, None)) is not None:
            setattr(msg, op, _settle(op, orig, msg.subject, durable))


def _settle(
    op: str, orig: Callable[..., Awaitable[Any]], subject: str, durable: str
) -> Callable[..., Awaitable[Any]]:
    async def settle(*args: Any, **kw: Any) -> Any:
        tr = tracing.active
        if tr is None or sampled_out():
            return await orig(*args, **kw)
        a = _attrs(op, "settle", subject, None)
        a["messaging.consumer.group.name"] = durable
        span = tr.start_span(
            f"{op} {template(subject)}",
            context=handler_context(),
            kind=SpanKind.CLIENT,
            attributes=a,
        )
        try:
            return await orig(*args, **kw)
        except BaseException as e:
            record_error(span, e)
            raise
        finally:
            span.end()

    return settle
