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

import logging
import os
import random
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.propagation import _SPAN_KEY

from .telemetry_lite import PARENTS, LiteSpan, LiteTracer, forced_ids
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
    new_span_id,
    new_trace_id,
    parse,
    parse_ids,
    template,
)

log = logging.getLogger("chainyard.telemetry")

SYSTEM = "nats"
_TRUE = ("1", "true", "yes", "on")
_now = time.time_ns

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
    from the `OTEL_*` variables: what `setup` installs, and what the benchmark measures. The
    export runs in a helper process (telemetry_child), or with `CHAINYARD_TRACE_EXPORT=thread`
    in a thread of this one (for a host with a single core)."""
    from .telemetry_child import ChildExport
    from .telemetry_export import OtlpHttpExporter
    from .telemetry_lite import LiteProvider, sampler_from_env

    if exporter is None:
        where = os.environ.get("CHAINYARD_TRACE_EXPORT", "").strip().lower()
        exporter = OtlpHttpExporter() if where == "thread" else ChildExport()
    return LiteProvider(resource, exporter, sampler=sampler_from_env(), **batch)


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

    def messaging(self, op: str, tmpl: str, **extra: str) -> Fixed:
        """The fixed attributes of a `{op} {tmpl}` messaging span, keyed by the template."""
        fixed = self.get(tmpl)
        if fixed is None:
            fixed = self.put(
                tmpl,
                f"{op} {tmpl}",
                {
                    "messaging.system": SYSTEM,
                    "messaging.operation.name": op,
                    "messaging.operation.type": op,
                    "messaging.destination.template": tmpl,
                    **extra,
                },
            )
        return fixed


_SEND = _FixedCache()
_SETTLE = _FixedCache()


def record_error(span: Span, e: BaseException, error_type: str | None = None) -> None:
    span.set_attribute("error.type", error_type or type(e).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(e)[:200]))


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
    """`js.publish` with `Nats-Msg-Id` (none when `msg_id` is empty), inside a `send` span whose
    context rides in the headers. `parent`: a Context (or a Span); by default the handler's
    scope or the current context."""
    ids = {"Nats-Msg-Id": msg_id} if msg_id else {}
    if _tracer is None:
        return await js.publish(subject, data, headers=ids or None)
    if parent is None:
        parent = _parent()
    elif type(parent) is Context:
        parent = parent.get(_SPAN_KEY)
    fixed = _SEND.messaging("send", template(subject))
    a = {"messaging.destination.name": subject, "messaging.message.id": msg_id}
    if attrs:
        a.update(attrs)
    lite = _lite
    remote = PARENTS.get(type(parent)) if lite is not None else None
    if remote is not None:  # the common case, inline: a light span under one of ours
        tid, sid, ts = parent._tid, new_span_id(), parent._ts
        span: Any = LiteSpan(
            lite, fixed.name, tid, sid, parent._sid, remote, ts, PRODUCER, fixed, a, False, _now()
        )
        headers = {**ids, TRACEPARENT: f"00-{tid}-{sid}-01"}
        if ts:
            headers[TRACESTATE] = ts.to_header()
    else:
        span = _start(parent, PRODUCER, fixed, a)
        headers = (
            span.inject(dict(ids))
            if type(span) is LiteSpan
            else inject(span.get_span_context(), dict(ids))
        )
    try:
        return await js.publish(subject, data, headers=headers)
    except BaseException as e:
        record_error(span, e)
        raise
    finally:
        span.end()


# The trace scope of a message handler lives in telemetry_scope (import it through this module
# only: it reads this module's state); its names are part of this module's API.
from .telemetry_scope import (  # noqa: E402, F401 - re-exported
    Scope,
    _parent,
    adopt,
    consumer,
    current_scope,
    parent_context,
)
