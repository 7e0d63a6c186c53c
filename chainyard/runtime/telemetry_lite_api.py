"""The OTel API side of chainyard's light spans: what user code and other libraries call.

chainyard's own helpers (telemetry.py) make and end spans through the fast path in
telemetry_lite (`LiteTracer.child` / `remote_child` / `with_ids`, `LiteSpan.inject` / `end`).
Everything else a Span or Tracer of the OTel API must do lives here, as mixins of `LiteSpan`
and `LiteTracer`: `start_span` with a Context, links and the SDK's samplers, the Span setters
(attributes, events, links, status, exceptions), and the ReadableSpan shape (name, context,
parent, kind, attributes, links, events, status, start_time, end_time, resource,
instrumentation_scope) that SDK exporters and the tests read.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.util.types import Attributes

from .telemetry_w3c import new_span_id, new_trace_id

# (trace id, span id) that the next span started in this context must use: a chain's own span,
# whose ids were drawn at intake (telemetry_chain.end_chain)
forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "chainyard_forced_ids", default=None
)

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
KIND_BACK = {
    1: SpanKind.INTERNAL,
    2: SpanKind.SERVER,
    3: SpanKind.CLIENT,
    4: SpanKind.PRODUCER,
    5: SpanKind.CONSUMER,
}
_current = otel_context.get_current
_now = time.time_ns
_UNSET = Status(StatusCode.UNSET)


class SpanApi(trace.Span):
    """The Span setters and the ReadableSpan properties of `telemetry_lite.LiteSpan` (whose
    slots they use)."""

    _attrs: dict[str, Any]
    _events: list[tuple[int, str, Any]] | None
    _fixed: Any
    _links: list[tuple[str, str, Any, Any, bool]] | None
    _pid: str
    _plink: bool
    _premote: bool
    _sid: str
    _status: tuple[int, str] | None
    _tid: str
    _tracer: Any
    _ts: Any
    end_time: int | None
    kind_pb: int
    name: str

    def set_attribute(self, key: str, value: Any) -> None:
        if self.end_time is None and value is not None:
            if self._fixed is not None and key in self._fixed.items:
                self._unfix()
            self._attrs[key] = value

    def set_attributes(self, attributes: Any) -> None:
        if self.end_time is not None:
            return
        if self._fixed is not None and not self._fixed.items.keys().isdisjoint(attributes):
            self._unfix()
        a = self._attrs
        for k, v in attributes.items():
            if v is not None:
                a[k] = v

    def _unfix(self) -> None:
        """A fixed attribute overwritten: keep them all in the span's own dict from now on."""
        self._attrs = {**self._fixed.items, **self._attrs}  # type: ignore[union-attr]
        self._fixed = None

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.end_time is None:
            if self._events is None:
                self._events = []
            self._events.append((timestamp or _now(), name, dict(attributes or {})))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        if self.end_time is None and context.is_valid:
            self._links = [*(self._links or ()), *_link_tuples([trace.Link(context, attributes)])]

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Any, description: str | None = None) -> None:
        if self.end_time is not None:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        if code is StatusCode.UNSET or (self._status is not None and self._status[0] == 1):
            return  # OK is final
        self._status = (code.value, (description or "") if code is StatusCode.ERROR else "")

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        a = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception)[:1000],
            "exception.escaped": escaped,
        }
        a.update(attributes or {})
        self.add_event("exception", a, timestamp)

    @property
    def attributes(self) -> dict[str, Any]:
        a = {**self._fixed.items, **self._attrs} if self._fixed is not None else dict(self._attrs)
        return {k: tuple(v) if type(v) is list else v for k, v in a.items()}  # as the SDK does

    @property
    def context(self) -> SpanContext:
        return self.get_span_context()

    @property
    def parent(self) -> SpanContext | None:
        if not self._pid:
            return None
        return SpanContext(int(self._tid, 16), int(self._pid, 16), self._premote, SAMPLED, self._ts)

    @property
    def kind(self) -> SpanKind:
        return KIND_BACK[self.kind_pb]

    def link_tuples(self) -> list[tuple[str, str, Any, Any, bool]]:
        """Every link as (trace id, span id, trace state, attributes, remote), hex ids."""
        own = [(self._tid, self._pid, self._ts, None, self._premote)] if self._plink else []
        return own + (self._links or [])

    @property
    def links(self) -> Sequence[trace.Link]:
        return tuple(
            trace.Link(SpanContext(int(t, 16), int(s, 16), r, SAMPLED, ts), a)
            for t, s, ts, a, r in self.link_tuples()
        )

    @property
    def events(self) -> Sequence[Any]:
        from opentelemetry.sdk.trace import Event

        return tuple(Event(n, a, t) for t, n, a in self._events or ())

    @property
    def status(self) -> Status:
        if self._status is None:
            return _UNSET
        return Status(StatusCode(self._status[0]), self._status[1] or None)

    @property
    def resource(self) -> Any:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> Any:
        return self._tracer.scope


def _link_tuples(links: Any) -> list[tuple[str, str, Any, Any, bool]] | None:
    out = [
        (f"{c.trace_id:032x}", f"{c.span_id:016x}", c.trace_state, lk.attributes, bool(c.is_remote))
        for lk in links or ()
        if (c := lk.context).is_valid
    ]
    return out or None


class TracerApi:
    """`start_span` of the OTel API for `telemetry_lite.LiteTracer`."""

    sampler: Any
    span_type: Any  # LiteSpan
    parents: dict[type, bool]  # span types whose hex ids a child reads directly

    def start_span(
        self,
        name: str,
        context: Any = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Any = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        p = (context if context is not None else _current()).get(_SPAN_KEY)
        remote = self.parents.get(type(p))
        if remote is not None:  # one of ours: no SpanContext to build
            return self._start(
                name,
                p._tid,
                p._sid,
                remote,
                p._ts,
                True,
                kind,
                attributes,
                links,
                start_time,
                context,
            )
        psc = p.get_span_context() if isinstance(p, trace.Span) else INVALID_SPAN_CONTEXT
        if psc.is_valid:
            return self._start(
                name,
                f"{psc.trace_id:032x}",
                f"{psc.span_id:016x}",
                psc.is_remote,
                psc.trace_state,
                psc.trace_flags & 1,
                kind,
                attributes,
                links,
                start_time,
                context,
            )
        return self._start(
            name, "", "", False, None, True, kind, attributes, links, start_time, context
        )

    def _start(
        self,
        name: str,
        tid: str,
        pid: str,
        premote: bool,
        ts: Any,
        sampled: Any,
        kind: SpanKind,
        attributes: Any,
        links: Any,
        start_time: int | None,
        context: Any,
    ) -> trace.Span:
        forced = forced_ids.get()
        if forced is not None:
            tid, sid = f"{forced[0]:032x}", f"{forced[1]:016x}"
        else:
            tid = tid or new_trace_id()
            sid = new_span_id()
        attrs = attributes if type(attributes) is dict else dict(attributes or {})  # kept
        if self.sampler is not None:
            if context is None and pid:
                flags = SAMPLED if sampled else UNSAMPLED
                context = trace.set_span_in_context(
                    NonRecordingSpan(SpanContext(int(tid, 16), int(pid, 16), premote, flags, ts))
                )
            r = self.sampler.should_sample(context, int(tid, 16), name, kind, attrs, links)
            sampled = r.decision.is_sampled()
            if r.attributes:
                attrs = {**attrs, **r.attributes}
            ts = r.trace_state or ts
        if not sampled:
            return NonRecordingSpan(SpanContext(int(tid, 16), int(sid, 16), False, UNSAMPLED, ts))
        span = self.span_type(
            self,
            name,
            tid,
            sid,
            pid,
            premote,
            ts,
            kind._value_ + 1,
            None,
            {k: v for k, v in attrs.items() if v is not None},
            False,
            start_time or _now(),
        )
        if links:
            span._links = _link_tuples(links)
        return span


class _Scope:
    """InstrumentationScope's shape."""

    def __init__(self, name: str, version: str | None) -> None:
        self.name = name
        self.version = version
        self.schema_url = ""
        self.attributes = None
