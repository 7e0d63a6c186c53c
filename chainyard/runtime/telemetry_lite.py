"""Chainyard's own spans: the OTel API's Span, recorded without the SDK's per-span machinery.

The SDK's `Tracer.start_span` + `end` cost 40-85 us a span on the 2-core bench box (attribute
validation one value at a time, a lock per span, sampler and processor dispatch, a ReadableSpan
copy at the end), ~9 spans a single-step chain. `LiteTracer.start_span` takes the same
arguments for the OTel API; chainyard's helpers use `child` / `remote_child` / `with_ids`
instead, handing over the parent span or the ids read from `traceparent` and the attributes
as a `telemetry_otlp.Fixed` (the repeating ones, encoded once) plus a fresh dict that is kept,
not copied. On `end` the span joins a queue that `SpanBatcher`'s thread encodes straight to
OTLP protobuf (telemetry_otlp) and POSTs in full batches.

What it keeps from the SDK: W3C ids and flags, parent-based sampling (any `OTEL_TRACES_SAMPLER`
other than the default `parentbased_always_on` is the SDK's own sampler, asked per span), the
`OTEL_BSP_*` batch settings (queue size, batch size, schedule delay, export timeout), the
resource (`Resource.create`: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, telemetry.sdk.*).
The spans are ReadableSpan-shaped (name, context, parent, kind, attributes, links, events,
status, start_time, end_time, resource, instrumentation_scope) so SDK exporters can take them.
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import logging
import os
import random
import threading
import time
import weakref
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
from opentelemetry.trace.propagation import _SPAN_KEY as _span_key
from opentelemetry.util.types import Attributes

from . import telemetry_otlp as otlp

log = logging.getLogger("chainyard.telemetry")

# (trace id, span id) that the next span started in this context must use: a chain's own span,
# whose ids were drawn at intake (telemetry_chain.end_chain)
forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "chainyard_forced_ids", default=None
)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_KIND = {
    SpanKind.INTERNAL: 1,
    SpanKind.SERVER: 2,
    SpanKind.CLIENT: 3,
    SpanKind.PRODUCER: 4,
    SpanKind.CONSUMER: 5,
}
_KIND_BACK = {v: k for k, v in _KIND.items()}
_SPAN_KEY = _span_key
_current = otel_context.get_current
_rand = random.getrandbits
_now = time.time_ns
_UNSET = Status(StatusCode.UNSET)


def _int_env(name: str, default: int) -> int:
    try:
        v = int(os.environ.get(name, "") or default)
        return v if v > 0 else default
    except ValueError:
        return default


class LiteSpan(trace.Span):
    """A recording span; immutable once ended.

    Attributes live in two parts: `_fixed` (a telemetry_otlp.Fixed: the ones that repeat from
    span to span, encoded once) and `_attrs` (this span's own dict); `attributes` merges them
    for readers. Links are kept as (trace id, span id, trace state, attributes, remote) tuples.
    """

    __slots__ = (
        "_attrs",
        "_ctx",
        "_events",
        "_fixed",
        "_links",
        "_pid",
        "_premote",
        "_sid",
        "_status",
        "_tid",
        "_tracer",
        "_ts",
        "end_time",
        "kind_pb",
        "name",
        "start_time",
    )

    def __init__(
        self,
        tracer: LiteTracer,
        name: str,
        tid: int,
        sid: int,
        pid: int,
        premote: bool,
        ts: Any,
        kind_pb: int,
        fixed: otlp.Fixed | None,
        attrs: dict[str, Any],
        links: list[tuple[int, int, Any, Any, bool]] | None,
        start_time: int,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self._tid = tid
        self._sid = sid
        self._pid = pid  # parent span id, 0 for a root
        self._premote = premote
        self._ts = ts
        self.kind_pb = kind_pb
        self._fixed = fixed
        self._attrs = attrs  # kept, not copied: the helpers pass a fresh dict
        self._links = links
        self._events: list[tuple[int, str, Any]] | None = None
        self._status: tuple[int, str] | None = None
        self.start_time = start_time
        self.end_time: int | None = None
        self._ctx: SpanContext | None = None

    # -- the OTel API's Span

    def get_span_context(self) -> SpanContext:
        c = self._ctx
        if c is None:
            c = self._ctx = SpanContext(self._tid, self._sid, False, _SAMPLED, self._ts)
        return c

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """W3C headers for this span, without building its SpanContext."""
        headers["traceparent"] = f"00-{self._tid:032x}-{self._sid:016x}-01"
        if self._ts:
            headers["tracestate"] = self._ts.to_header()
        return headers

    def is_recording(self) -> bool:
        return self.end_time is None

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

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is None:
            self.end_time = end_time or _now()
            self._tracer.batcher.add(self)

    # -- ReadableSpan's shape (for SDK exporters and tests)

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
        return SpanContext(self._tid, self._pid, self._premote, _SAMPLED, self._ts)

    @property
    def kind(self) -> SpanKind:
        return _KIND_BACK[self.kind_pb]

    @property
    def links(self) -> Sequence[trace.Link]:
        return tuple(
            trace.Link(SpanContext(t, s, r, _SAMPLED, ts), a)
            for t, s, ts, a, r in self._links or ()
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

    def otlp(self) -> tuple[tuple[bytes, bytes], bytes]:
        """((resource field, scope field), Span body) for telemetry_otlp.encode."""
        tr = self._tracer
        links = self._links
        ts = self._ts
        st = self._status
        fixed = self._fixed
        if (
            self._events is None
            and st is None
            and not ts
            and (links is None or (len(links) == 1 and _plain_link(links[0], self)))
        ):  # nearly every span: no trace state, event or status, a process span's one link
            return (
                tr.group,
                otlp.encode_light(
                    self._tid,
                    self._sid,
                    self._pid,
                    self._premote,
                    self.name,
                    self.kind_pb,
                    self.start_time,
                    self.end_time or 0,
                    fixed.pb if fixed is not None else b"",
                    self._attrs,
                    self._pid if links else 0,
                ),
            )
        return (
            tr.group,
            otlp.encode_span(
                self._tid,
                self._sid,
                self._pid,
                self._premote,
                ts.to_header() if ts else "",
                self.name,
                self.kind_pb,
                self.start_time,
                self.end_time or 0,
                self._attrs,
                self._events,
                [(t, s, x.to_header() if x else "", a, r) for t, s, x, a, r in links]
                if links
                else None,
                st[0] if st else 0,
                st[1] if st else "",
                fixed.pb if fixed is not None else b"",
            ),
        )

    def __repr__(self) -> str:
        return f"LiteSpan({self.name!r}, {self._tid:032x}/{self._sid:016x})"


def _plain_link(link: tuple[int, int, Any, Any, bool], span: LiteSpan) -> bool:
    """The link is to the span's own parent, without attributes or trace state."""
    t, s, ts, a, r = link
    return t == span._tid and s == span._pid and not ts and not a and r == span._premote


def _link_tuples(links: Any) -> list[tuple[int, int, Any, Any, bool]] | None:
    out = [
        (c.trace_id, c.span_id, c.trace_state, lk.attributes, bool(c.is_remote))
        for lk in links or ()
        if (c := lk.context).is_valid
    ]
    return out or None


class LiteTracer:
    """`start_span` for the OTel API, and `child` / `remote_child` for chainyard's helpers
    (no Context, no SpanContext, no Link objects on the way); the spans go to `batcher` when
    they end."""

    def __init__(
        self,
        batcher: SpanBatcher,
        resource: Any,
        scope_name: str = "chainyard",
        scope_version: str | None = None,
        sampler: Any = None,
    ) -> None:
        self.batcher = batcher
        self.resource = resource
        self.scope = _Scope(scope_name, scope_version)
        self.resource_pb = otlp.encode_resource(dict(resource.attributes))
        self.scope_pb = otlp.encode_scope(scope_name, scope_version)
        self.group = (self.resource_pb, self.scope_pb)  # how telemetry_otlp.encode groups spans
        self.sampler = sampler  # None: parent-based always on, decided inline

    # -- chainyard's helpers (telemetry.py) when the sampler is the default

    def child(
        self,
        parent: Any,
        kind_pb: int,
        fixed: otlp.Fixed,
        attrs: dict[str, Any],
        start_time: int | None = None,
    ) -> trace.Span:
        """A span named `fixed.name` under `parent`: a LiteSpan, another Span, or None (a root)."""
        if type(parent) is LiteSpan:
            return LiteSpan(
                self,
                fixed.name,
                parent._tid,
                _rand(64) or 1,
                parent._sid,
                False,
                parent._ts,
                kind_pb,
                fixed,
                attrs,
                None,
                start_time or _now(),
            )
        sc = parent.get_span_context() if parent is not None else INVALID_SPAN_CONTEXT
        if not sc.is_valid:
            return LiteSpan(
                self,
                fixed.name,
                _rand(128) or 1,
                _rand(64) or 1,
                0,
                False,
                None,
                kind_pb,
                fixed,
                attrs,
                None,
                start_time or _now(),
            )
        return self.remote_child(
            sc.trace_id,
            sc.span_id,
            sc.trace_flags,
            sc.trace_state,
            kind_pb,
            fixed,
            attrs,
            False,
            start_time,
            sc.is_remote,
        )

    def remote_child(
        self,
        tid: int,
        pid: int,
        flags: int,
        ts: Any,
        kind_pb: int,
        fixed: otlp.Fixed,
        attrs: dict[str, Any],
        link: bool,
        start_time: int | None = None,
        remote: bool = True,
    ) -> trace.Span:
        """A span under a parent known by its ids (a message's traceparent), linked to it too
        with `link` (a process span)."""
        sid = _rand(64) or 1
        if not flags & 1:
            return NonRecordingSpan(SpanContext(tid, sid, False, _UNSAMPLED, ts))
        return LiteSpan(
            self,
            fixed.name,
            tid,
            sid,
            pid,
            remote,
            ts,
            kind_pb,
            fixed,
            attrs,
            [(tid, pid, ts, None, remote)] if link else None,
            start_time or _now(),
        )

    def with_ids(
        self,
        tid: int,
        sid: int,
        pid: int,
        ts: Any,
        kind_pb: int,
        fixed: otlp.Fixed,
        attrs: dict[str, Any],
        start_time: int,
    ) -> LiteSpan:
        """A span whose own ids are given (a chain's, drawn at intake), under a remote parent."""
        return LiteSpan(
            self, fixed.name, tid, sid, pid, pid != 0, ts, kind_pb, fixed, attrs, None, start_time
        )

    # -- the OTel API

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
        if type(p) is LiteSpan:  # a local parent: no SpanContext to build
            return self._start(
                name,
                p._tid,
                p._sid,
                False,
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
                psc.trace_id,
                psc.span_id,
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
            name, 0, 0, False, None, True, kind, attributes, links, start_time, context
        )

    def _start(
        self,
        name: str,
        tid: int,
        pid: int,
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
            tid, sid = forced
        else:
            tid = tid or _rand(128) or 1
            sid = _rand(64) or 1
        attrs = attributes if type(attributes) is dict else dict(attributes or {})  # kept
        if self.sampler is not None:
            if context is None and pid:
                context = trace.set_span_in_context(
                    NonRecordingSpan(
                        SpanContext(tid, pid, premote, _SAMPLED if sampled else _UNSAMPLED, ts)
                    )
                )
            r = self.sampler.should_sample(context, tid, name, kind, attrs, links)
            sampled = r.decision.is_sampled()
            if r.attributes:
                attrs = {**attrs, **r.attributes}
            ts = r.trace_state or ts
        if not sampled:
            return NonRecordingSpan(SpanContext(tid, sid, False, _UNSAMPLED, ts))
        return LiteSpan(
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
            _link_tuples(links) if links else None,
            start_time or _now(),
        )


class _Scope:
    """InstrumentationScope's shape."""

    def __init__(self, name: str, version: str | None) -> None:
        self.name = name
        self.version = version
        self.schema_url = ""
        self.attributes = None


class SpanBatcher:
    """A queue of ended spans and the thread that exports them in batches.

    Like the SDK's BatchSpanProcessor, configured by the same variables: `OTEL_BSP_MAX_QUEUE_SIZE`
    (2048; spans beyond it are dropped and counted), `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512; a full
    batch wakes the thread), `OTEL_BSP_SCHEDULE_DELAY` (ms, 5000: the longest a span waits),
    `OTEL_BSP_EXPORT_TIMEOUT`. `exporter` needs `send(spans) -> bool` (OtlpHttpExporter) or the
    SDK's `export(spans)`. The SDK's own spans (other libraries' instrumentation under the global
    provider) join the same queue through `span_processor()`.
    """

    def __init__(
        self,
        exporter: Any,
        *,
        max_queue_size: int | None = None,
        max_export_batch_size: int | None = None,
        schedule_delay_ms: int | None = None,
    ) -> None:
        self.exporter = exporter
        self.max_queue = max_queue_size or _int_env("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.max_batch = min(
            self.max_queue, max_export_batch_size or _int_env("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        )
        self.delay = (schedule_delay_ms or _int_env("OTEL_BSP_SCHEDULE_DELAY", 5000)) / 1000
        self._send = getattr(exporter, "send", None)
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        self._stop = False
        self.dropped = 0
        self.failed = 0
        self.exported_spans = 0  # handed to the exporter (counts for the benchmark)
        self.export_cpu_s = 0.0  # CPU time spent encoding and sending them
        self._thread: threading.Thread | None = None
        self._start()
        weak = weakref.ref(self)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: (b := weak()) and b._after_fork())
        atexit.register(lambda: (b := weak()) and b.shutdown())

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chainyard-span-export", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        self._queue.clear()
        self._export_lock = threading.Lock()
        self._wake = threading.Event()
        if not self._stop:
            self._start()

    def add(self, span: Any) -> None:
        q = self._queue
        n = len(q)
        if n >= self.max_queue:
            self.dropped += 1
            return
        q.append(span)
        if n + 1 == self.max_batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            full = self._wake.wait(self.delay)
            self._wake.clear()
            # Woken by a full batch: send full batches only. Draining to the end instead sent
            # whatever had arrived meanwhile, ~100 spans a request under load, and a request
            # costs ~300 us of this process's CPU whatever its size. The schedule delay (or a
            # flush) sends the rest.
            self._drain(full_only=full)

    def _drain(self, full_only: bool = False) -> None:
        with self._export_lock:
            q = self._queue
            pop = q.popleft
            while q:
                n = min(len(q), self.max_batch)
                if full_only and n < self.max_batch:
                    return
                batch = [pop() for _ in range(n)]
                c0 = time.thread_time()
                try:
                    if self._send is not None:
                        ok = self._send(batch)
                    else:
                        from opentelemetry.sdk.trace.export import SpanExportResult

                        ok = self.exporter.export(batch) == SpanExportResult.SUCCESS
                except Exception as e:  # exporting must never take a service down
                    log.warning("span export failed: %s", e)
                    ok = False
                if not ok:
                    self.failed += len(batch)
                self.exported_spans += len(batch)
                self.export_cpu_s += time.thread_time() - c0

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._drain()
        return True

    def shutdown(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        self._drain()
        with self._export_lock:
            self.exporter.shutdown()

    def span_processor(self) -> Any:
        """An SDK SpanProcessor that puts the SDK's sampled spans in this queue."""
        from opentelemetry.sdk.trace import SpanProcessor

        batcher = self

        class _Processor(SpanProcessor):
            def on_end(self, span: Any) -> None:
                if span.context.trace_flags.sampled:
                    batcher.add(span)

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return batcher.force_flush(timeout_millis)

            def shutdown(self) -> None:
                batcher.shutdown()

        return _Processor()


class LiteProvider:
    """What `telemetry.setup` installs: a LiteTracer for chainyard's spans, an SDK
    TracerProvider (the global one, for other libraries) feeding the same batcher."""

    def __init__(self, resource: Any, exporter: Any, *, sampler: Any = None, **batch: Any) -> None:
        self.batcher = SpanBatcher(exporter, **batch)
        self.tracer = LiteTracer(self.batcher, resource, sampler=sampler)
        self.resource = resource

    def get_tracer(self, name: str = "chainyard", *args: Any, **kw: Any) -> LiteTracer:
        return self.tracer

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batcher.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.batcher.shutdown()


def sampler_from_env() -> Any:
    """None for the default (parent-based always on, decided inline); else the SDK's sampler."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name in ("", "parentbased_always_on"):
        return None
    from opentelemetry.sdk.trace import sampling

    return sampling._get_from_env_or_default()


__all__ = [
    "INVALID_SPAN_CONTEXT",
    "LiteProvider",
    "LiteSpan",
    "LiteTracer",
    "SpanBatcher",
    "forced_ids",
    "sampler_from_env",
]
