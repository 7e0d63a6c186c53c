"""Chainyard's own spans: the OTel API's Span, recorded without the SDK's per-span machinery.

The SDK's `Tracer.start_span` + `end` cost 40-85 us a span on the 2-core bench box (attribute
validation one value at a time, a lock per span, sampler and processor dispatch, a ReadableSpan
copy at the end), ~9 spans a single-step chain. `LiteTracer.start_span` takes the same
arguments for the OTel API; chainyard's helpers use `child` / `remote_child` / `with_ids`
instead, handing over the parent span or the ids read from `traceparent` and the attributes
as a `telemetry_otlp.Fixed` (the repeating ones, encoded once) plus a fresh dict that is kept,
not copied. On `end` the span joins its batcher: by default `telemetry_child.ChildBatcher`,
which pipes full batches to a helper process that encodes them straight to OTLP protobuf
(telemetry_otlp) and POSTs them; with another exporter, `SpanBatcher`'s thread does that here.

What it keeps from the SDK: W3C ids and flags, parent-based sampling (any `OTEL_TRACES_SAMPLER`
other than the default `parentbased_always_on` is the SDK's own sampler, asked per span), the
`OTEL_BSP_*` batch settings (queue size, batch size, schedule delay, export timeout), the
resource (`Resource.create`: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, telemetry.sdk.*).
The spans are ReadableSpan-shaped (name, context, parent, kind, attributes, links, events,
status, start_time, end_time, resource, instrumentation_scope) so SDK exporters can take them.
This module is the fast path; the rest of the OTel API (the Span setters and properties,
`start_span`) is in telemetry_lite_api, the batching thread in telemetry_export.
"""

from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext

from . import telemetry_otlp as otlp
from .telemetry_export import Batching, SpanBatcher
from .telemetry_lite_api import SAMPLED, UNSAMPLED, SpanApi, TracerApi, _Scope, forced_ids
from .telemetry_w3c import new_span_id, new_trace_id

_now = time.time_ns


class LiteSpan(SpanApi):
    """A recording span; immutable once ended.

    Ids are lowercase hex strings, as traceparent writes them (`_pid` "" for a root): a span's
    ids are read from one header and written into the next without a conversion, and the export
    thread turns them into bytes. Attributes live in two parts: `_fixed` (a telemetry_otlp.Fixed:
    the ones that repeat from span to span, encoded once) and `_attrs` (this span's own dict);
    `attributes` merges them for readers. `_plink`: linked to its own parent (a process span's
    creation context); other links are (trace id, span id, trace state, attributes, remote).
    """

    __slots__ = (
        "_attrs",
        "_ctx",
        "_events",
        "_fixed",
        "_links",
        "_pid",
        "_plink",
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
        tid: str,
        sid: str,
        pid: str,
        premote: bool,
        ts: Any,
        kind_pb: int,
        fixed: otlp.Fixed | None,
        attrs: dict[str, Any],
        plink: bool,
        start_time: int,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self._tid = tid
        self._sid = sid
        self._pid = pid
        self._premote = premote
        self._ts = ts
        self.kind_pb = kind_pb
        self._fixed = fixed
        self._attrs = attrs  # kept, not copied: the helpers pass a fresh dict
        self._plink = plink
        self._links: list[tuple[str, str, Any, Any, bool]] | None = None
        self._events: list[tuple[int, str, Any]] | None = None
        self._status: tuple[int, str] | None = None
        self.start_time = start_time
        self.end_time: int | None = None
        self._ctx: SpanContext | None = None

    # -- the OTel API's Span

    def get_span_context(self) -> SpanContext:
        c = self._ctx
        if c is None:
            c = self._ctx = SpanContext(
                int(self._tid, 16), int(self._sid, 16), False, SAMPLED, self._ts
            )
        return c

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """W3C headers for this span, without building its SpanContext."""
        headers["traceparent"] = f"00-{self._tid}-{self._sid}-01"
        if self._ts:
            headers["tracestate"] = self._ts.to_header()
        return headers

    def is_recording(self) -> bool:
        return self.end_time is None

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is None:
            self.end_time = end_time or _now()
            self._tracer.add(self)

    def otlp(self) -> tuple[tuple[bytes, bytes], bytes]:
        """((resource field, scope field), Span body) for telemetry_otlp.encode, when the span
        is more than its common case (otlp.encode_light): trace state, events, status, links."""
        ts, st, fixed = self._ts, self._status, self._fixed
        return (
            self._tracer.group,
            otlp.encode_span(
                int(self._tid, 16),
                int(self._sid, 16),
                int(self._pid, 16) if self._pid else 0,
                self._premote,
                ts.to_header() if ts else "",
                self.name,
                self.kind_pb,
                self.start_time,
                self.end_time or 0,
                self._attrs,
                self._events,
                [
                    (int(t, 16), int(s, 16), x.to_header() if x else "", a, r)
                    for t, s, x, a, r in self.link_tuples()
                ]
                or None,
                st[0] if st else 0,
                st[1] if st else "",
                fixed.pb if fixed is not None else b"",
            ),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self._tid}/{self._sid})"


class SpanRef(NonRecordingSpan):
    """A sampled span known by its ids only (a chain's: drawn at intake, emitted at the chain's
    end): a parent the light tracer reads the ids of directly; other code sees a NonRecordingSpan
    with a remote SpanContext."""

    def __init__(self, tid: str, sid: str, ts: Any) -> None:  # no SpanContext until asked
        self._tid = tid
        self._sid = sid
        self._ts = ts

    def get_span_context(self) -> SpanContext:
        return SpanContext(int(self._tid, 16), int(self._sid, 16), True, SAMPLED, self._ts)

    @property
    def _context(self) -> SpanContext:  # type: ignore[override]  # NonRecordingSpan's repr
        return self.get_span_context()


# span types whose ids a child reads directly -> whether that parent is remote to the child
# (telemetry_scope adds its process span)
PARENTS: dict[type, bool] = {LiteSpan: False, SpanRef: True}
otlp.LIGHT.add(LiteSpan)


class LiteTracer(TracerApi):
    """`start_span` for the OTel API, and `child` / `remote_child` for chainyard's helpers
    (no Context, no SpanContext, no Link objects on the way); the spans go to `batcher` when
    they end. `start_span` (the OTel API) is TracerApi's, in telemetry_lite_api."""

    span_type = LiteSpan
    parents = PARENTS

    def __init__(
        self,
        batcher: Batching,
        resource: Any,
        scope_name: str = "chainyard",
        scope_version: str | None = None,
        sampler: Any = None,
    ) -> None:
        self.batcher = batcher
        self.add = batcher.add  # what an ended span joins
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
        remote = PARENTS.get(type(parent))
        if remote is not None:
            return LiteSpan(
                self,
                fixed.name,
                parent._tid,
                new_span_id(),
                parent._sid,
                remote,
                parent._ts,
                kind_pb,
                fixed,
                attrs,
                False,
                start_time or _now(),
            )
        sc = parent.get_span_context() if parent is not None else INVALID_SPAN_CONTEXT
        if parent is None or not sc.is_valid:
            return LiteSpan(
                self,
                fixed.name,
                new_trace_id(),
                new_span_id(),
                "",
                False,
                None,
                kind_pb,
                fixed,
                attrs,
                False,
                start_time or _now(),
            )
        return self.remote_child(
            f"{sc.trace_id:032x}",
            f"{sc.span_id:016x}",
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
        tid: str,
        pid: str,
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
        if not flags & 1:
            sc = SpanContext(int(tid, 16), int(new_span_id(), 16), False, UNSAMPLED, ts)
            return NonRecordingSpan(sc)
        return LiteSpan(
            self,
            fixed.name,
            tid,
            new_span_id(),
            pid,
            remote,
            ts,
            kind_pb,
            fixed,
            attrs,
            link,
            start_time or _now(),
        )

    def with_ids(
        self,
        tid: str,
        sid: str,
        pid: str,
        ts: Any,
        kind_pb: int,
        fixed: otlp.Fixed,
        attrs: dict[str, Any],
        start_time: int,
    ) -> LiteSpan:
        """A span whose own ids are given (a chain's, drawn at intake), under a remote parent."""
        return LiteSpan(
            self, fixed.name, tid, sid, pid, bool(pid), ts, kind_pb, fixed, attrs, False, start_time
        )


class LiteProvider:
    """What `telemetry.setup` installs: a LiteTracer for chainyard's spans, an SDK
    TracerProvider (the global one, for other libraries) feeding the same batcher."""

    def __init__(self, resource: Any, exporter: Any, *, sampler: Any = None, **batch: Any) -> None:
        from .telemetry_child import ChildBatcher, ChildExport

        self.batcher: Batching = (
            ChildBatcher(exporter, **batch)
            if isinstance(exporter, ChildExport)
            else SpanBatcher(exporter, **batch)
        )
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
    "PARENTS",
    "LiteProvider",
    "LiteSpan",
    "LiteTracer",
    "SpanBatcher",
    "SpanRef",
    "forced_ids",
    "sampler_from_env",
]
