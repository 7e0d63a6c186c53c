"""Tracing: W3C trace context in NATS headers, messaging spans, OTLP/HTTP export.

Off unless configured: with no `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`), or with
`OTEL_SDK_DISABLED=true`, `setup` installs nothing and every helper here returns after one
check of a module global (measured in docs/TRACING.md). On, chainyard's light tracer
(telemetry_lite: OTel API spans without the SDK's per-span cost) with a batching thread that
encodes OTLP protobuf directly and POSTs it (telemetry_otlp), configured by the standard `OTEL_*`
variables (endpoint, headers, timeout, sampler, batch sizes); `OTEL_SERVICE_NAME` wins over the
default service name (`chainyard-router`, `chainyard-worker`). The SDK's TracerProvider is
installed as the global one, feeding the same export queue, for other libraries' spans.

Propagation: `traceparent` / `tracestate` are written lowercase into NATS headers and read
case-insensitively (a Go client's `Traceparent` works). Spans follow the OpenTelemetry messaging
conventions: `send <template>` (PRODUCER), `process <template>` (CONSUMER, child of the message's
creation context and linked to it), `ack|nak|term <template>` (settle, CLIENT), with
`messaging.system = "nats"` and the subject template (`cy.work.{pool}`) in the span name.

Inside a service every message handler runs in its own task; `consumer()` keeps the handler's
trace scope in a context variable, so the helpers called by the handler (publish, chain and
GenAI spans) find their parent without passing it around. A message without trace headers
(a timer, a control message from a client without tracing) gets its process span late: as a
child of the chain's own span once the handler has read the chain state (`adopt`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation import _SPAN_KEY

from .telemetry_lite import LiteSpan, LiteTracer, forced_ids
from .telemetry_otlp import Fixed
from .telemetry_w3c import (  # noqa: F401 - re-exported
    TRACEPARENT,
    TRACESTATE,
    context_of,
    extract,
    extract_ids,
    format_traceparent,
    header,
    inject,
    parse,
    parse_ids,
    template,
)

log = logging.getLogger("chainyard.telemetry")

SYSTEM = "nats"
_TRUE = ("1", "true", "yes", "on")

# -- state: None means off, and every helper returns at once --------------------------------

_tracer: Any = None  # an opentelemetry Tracer when tracing is on
# the same tracer when it is chainyard's LiteTracer with the default sampler: the helpers then
# hand it spans and ids directly (`_start`), with no OTel Context, SpanContext or Link in between
_lite: LiteTracer | None = None
_provider: Any = None  # the TracerProvider we installed (setup), to flush and shut down
capture_content = False  # OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT
# ack / nak / term spans: CHAINYARD_TRACE_SETTLE=true (off by default: 3 of ~12 spans a step)
settle_spans = os.environ.get("CHAINYARD_TRACE_SETTLE", "").strip().lower() in _TRUE
_forced = forced_ids  # a chain's own span: ids drawn at intake (telemetry_chain.end_chain)


def enabled() -> bool:
    return _tracer is not None


def tracer() -> Any:
    return _tracer


class _ChainIds:
    """Random ids, except when a chain's own span is emitted: its ids were fixed at intake."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self._rng = random.Random()

    def generate_span_id(self) -> int:
        forced = _forced.get()
        if forced is not None:
            return forced[1]
        return self.inner.generate_span_id() if self.inner else self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        forced = _forced.get()
        if forced is not None:
            return forced[0]
        return self.inner.generate_trace_id() if self.inner else self._rng.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return True


def new_span_id() -> int:
    return random.getrandbits(64) or 1


def configured() -> bool:
    """What the standard variables say: an OTLP endpoint is set and the SDK is not disabled."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def service_name(default: str) -> str:
    return os.environ.get("OTEL_SERVICE_NAME") or default


def setup(default_service: str) -> bool:
    """Install OTLP/HTTP tracing from the `OTEL_*` variables; False (and nothing) when off."""
    global _provider
    if not configured():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create({"service.name": service_name(default_service)})
    provider = build_provider(resource)
    # the global provider, for other libraries' spans: the SDK's, feeding the same export queue
    sdk = TracerProvider(resource=resource, id_generator=_ChainIds())  # sampler: env
    sdk.add_span_processor(provider.batcher.span_processor())
    trace.set_tracer_provider(sdk)
    _provider = provider
    enable(provider)
    log.info(
        "tracing to %s as %s",
        provider.batcher.exporter.endpoint,
        resource.attributes.get("service.name"),
    )
    return True


def build_provider(resource: Any, exporter: Any = None, **batch: Any) -> Any:
    """Chainyard's tracer (telemetry_lite) exporting OTLP/HTTP protobuf (telemetry_otlp), set up
    from the `OTEL_*` variables: what `setup` installs, and what the benchmark measures."""
    from .telemetry_export import OtlpHttpExporter
    from .telemetry_lite import LiteProvider, sampler_from_env

    return LiteProvider(
        resource, exporter or OtlpHttpExporter(), sampler=sampler_from_env(), **batch
    )


def enable(provider: Any, *, capture: bool | None = None) -> None:
    """Trace with `provider`: an SDK TracerProvider (tests, embedding apps) or the LiteProvider
    of `build_provider` (services, benchmarks)."""
    global _tracer, _lite, capture_content
    t = provider.get_tracer("chainyard")
    if hasattr(t, "id_generator") and not isinstance(t.id_generator, _ChainIds):
        t.id_generator = _ChainIds(t.id_generator)  # a chain's span keeps the id given at intake
    if capture is None:
        env = os.environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "")
        capture = env.strip().lower() in _TRUE
    capture_content = capture
    _tracer = t
    _lite = t if type(t) is LiteTracer and t.sampler is None else None


def disable() -> None:
    global _tracer, _lite
    _tracer = _lite = None


def use_global() -> bool:
    """Trace with the application's own SDK provider, if it installed one (the client does)."""
    if _tracer is not None:
        return True
    p = trace.get_tracer_provider()
    if type(p).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return False
    enable(p)
    return True


def flush(timeout_ms: int = 5000) -> None:
    p = _provider or trace.get_tracer_provider()
    if hasattr(p, "force_flush"):
        p.force_flush(timeout_ms)


def shutdown() -> None:
    global _provider
    disable()
    if _provider is not None:
        try:
            _provider.force_flush(5000)
            _provider.shutdown()
        except Exception as e:  # exporting must never fail a service's exit
            log.warning("telemetry shutdown: %s", e)
        _provider = None


_KINDS = (
    SpanKind.INTERNAL,
    SpanKind.INTERNAL,
    SpanKind.SERVER,
    SpanKind.CLIENT,
    SpanKind.PRODUCER,
    SpanKind.CONSUMER,
)  # by protobuf value
INTERNAL, CLIENT, PRODUCER, CONSUMER = 1, 3, 4, 5


def _start(
    parent: Any, kind_pb: int, fixed: Fixed, attrs: dict[str, Any], start_ns: int | None = None
) -> Any:
    """A span named `fixed.name` with `fixed`'s and `attrs`' attributes, under `parent` (a Span,
    or None for a new trace): straight to the LiteTracer, else through the OTel API."""
    lite = _lite
    if lite is not None:
        return lite.child(parent, kind_pb, fixed, attrs, start_ns)
    return _tracer.start_span(
        fixed.name,
        context=Context({_SPAN_KEY: parent}) if parent is not None else Context(),
        kind=_KINDS[kind_pb],
        attributes={**fixed.items, **attrs},
        start_time=start_ns,
    )


class _FixedCache(dict[Any, Fixed]):
    """Fixed attributes by what they depend on (a subject template, a consumer, a model);
    bounded, as the keys come from messages."""

    def put(self, key: Any, name: str, items: dict[str, Any]) -> Fixed:
        if len(self) > 1024:
            self.clear()
        f = self[key] = Fixed(name, items)
        return f


_PROCESS = _FixedCache()
_SEND = _FixedCache()
_SETTLE = _FixedCache()


def record_error(span: Span, e: BaseException, error_type: str | None = None) -> None:
    span.set_attribute("error.type", error_type or type(e).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(e)[:200]))


# -- the trace scope of one message handler ---------------------------------------------------


class Scope:
    """The process span of the message being handled, started late when it had no context."""

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
                p = (p.trace_id, p.span_id, p.trace_flags, p.trace_state)
            lite = _lite
            if lite is not None:
                if p is None:
                    span = lite.child(None, CONSUMER, self.fixed, self.attrs, self.start_ns)
                else:
                    span = lite.remote_child(
                        *p, CONSUMER, self.fixed, self.attrs, self.link, self.start_ns
                    )
            else:
                sc = SpanContext(p[0], p[1], True, TraceFlags(p[2]), p[3]) if p else None
                span = _tracer.start_span(
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

    def context(self) -> Any:
        return Context({_SPAN_KEY: self.current()})


_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "chainyard_trace_scope", default=None
)
# OTel's current-context variable, set directly around a handler (attach / detach do the same
# through two more calls and a lookup each); None if this OTel version keeps it elsewhere
_otel_cv: contextvars.ContextVar[Any] | None = getattr(
    getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None
)
if not isinstance(_otel_cv, contextvars.ContextVar):
    _otel_cv = None


def current_scope() -> Scope | None:
    return _scope.get()


def parent_context() -> Any:
    """Where a span made now belongs: the handler's scope, else the caller's current context."""
    s = _scope.get()
    return s.context() if s is not None else otel_context.get_current()


def _parent() -> Any:
    """`parent_context()`'s span, without making the Context (None: a new trace)."""
    s = _scope.get()
    if s is not None:
        return s.current()
    return otel_context.get_current().get(_SPAN_KEY)


def adopt(sc: SpanContext | None, *, as_chain: bool = False) -> None:
    """Give a handler whose message carried no context the chain's context (from its state).

    With `as_chain`, later spans of the handler are children of the chain's span even though
    the process span itself exists (intake: the chain's first steps hang under the chain).
    """
    s = _scope.get()
    if s is None or sc is None:
        return
    if as_chain:
        s.chain_span = NonRecordingSpan(sc)
    elif s.span is None and s.parent is None:
        s.parent = sc


def consumer(
    handler: Callable[[Any], Awaitable[None]], durable: str, *, pool: str | None = None
) -> Callable[[Any], Awaitable[None]]:
    """Wrap a pull consumer's message handler in a `process` span (and settle spans for its
    ack / nak / term). With `pool`, also count the work in flight (metrics)."""
    from .telemetry_metrics import metrics

    async def traced(msg: Any) -> None:
        counted = pool is not None and metrics.on
        if counted:
            metrics.in_flight(pool, 1)  # type: ignore[arg-type]
        try:
            if _tracer is None:
                await handler(msg)
            else:  # inline, not a nested coroutine: every resume of the handler passes here
                scope, token, otel_token = _begin(msg, durable)
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


def _begin(msg: Any, durable: str) -> tuple[Scope, Any, Any]:
    subject = msg.subject
    tmpl = template(subject)
    fixed = _PROCESS.get((tmpl, durable))
    if fixed is None:
        fixed = _PROCESS.put(
            (tmpl, durable),
            f"process {tmpl}",
            {
                "messaging.system": SYSTEM,
                "messaging.operation.name": "process",
                "messaging.operation.type": "process",
                "messaging.destination.template": tmpl,
                "messaging.consumer.group.name": durable,
            },
        )
    attrs = {"messaging.destination.name": subject}
    headers = msg.headers
    parent = None
    if headers:
        mid = headers.get("Nats-Msg-Id") or header(headers, "nats-msg-id")
        if mid:
            attrs["messaging.message.id"] = mid
        parent = extract_ids(headers)
    scope = Scope(fixed, attrs, parent)
    token = _scope.set(scope)
    if settle_spans:
        _settle_spans(msg, scope, tmpl, subject, durable)
    otel_token = None
    if parent is not None:  # the common case: start now, and let user code see it as current
        ctx = Context({_SPAN_KEY: scope.ensure()})
        otel_token = _otel_cv.set(ctx) if _otel_cv is not None else otel_context.attach(ctx)
    return scope, token, otel_token


def _finish(scope: Scope, token: Any, otel_token: Any) -> None:
    if otel_token is not None:
        if _otel_cv is not None:
            _otel_cv.reset(otel_token)
        else:
            otel_context.detach(otel_token)
    _scope.reset(token)
    (scope.span or scope.ensure()).end()


def _settle_spans(msg: Any, scope: Scope, tmpl: str, subject: str, durable: str) -> None:
    for op in ("ack", "nak", "term"):
        orig = getattr(msg, op, None)
        if orig is not None:
            setattr(msg, op, _settle(op, orig, scope, tmpl, subject, durable))


def _settle(
    op: str,
    orig: Callable[..., Awaitable[Any]],
    scope: Scope,
    tmpl: str,
    subject: str,
    durable: str,
) -> Callable[..., Awaitable[Any]]:
    async def settle(*args: Any, **kw: Any) -> Any:
        if _tracer is None:
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


# -- send ---------------------------------------------------------------------------------------


async def publish(
    js: Any,
    subject: str,
    data: bytes,
    msg_id: str,
    *,
    attrs: dict[str, Any] | None = None,
    parent: Any = None,
) -> Any:
    """`js.publish` with `Nats-Msg-Id`, inside a `send` span whose context rides in the headers.
    `parent`: a Context (or a Span); by default the handler's scope or the current context."""
    if _tracer is None:
        return await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
    if parent is None:
        parent = _parent()
    elif type(parent) is Context:
        parent = parent.get(_SPAN_KEY)
    tmpl = template(subject)
    fixed = _SEND.get(tmpl)
    if fixed is None:
        fixed = _SEND.put(
            tmpl,
            f"send {tmpl}",
            {
                "messaging.system": SYSTEM,
                "messaging.operation.name": "send",
                "messaging.operation.type": "send",
                "messaging.destination.template": tmpl,
            },
        )
    a = {"messaging.destination.name": subject, "messaging.message.id": msg_id}
    if attrs:
        a.update(attrs)
    span = _start(parent, PRODUCER, fixed, a)
    headers = (
        span.inject({"Nats-Msg-Id": msg_id})
        if type(span) is LiteSpan
        else inject(span.get_span_context(), {"Nats-Msg-Id": msg_id})
    )
    try:
        return await js.publish(subject, data, headers=headers)
    except BaseException as e:
        record_error(span, e)
        raise
    finally:
        span.end()
