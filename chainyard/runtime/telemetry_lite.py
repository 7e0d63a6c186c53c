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
This module is the fast path; the rest of the OTel API (the Span setters and properties,
`start_span`) is in telemetry_lite_api, the batching thread in telemetry_export.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext

from . import telemetry_otlp as otlp
from .telemetry_export import SpanBatcher
from .telemetry_lite_api import SAMPLED, UNSAMPLED, SpanApi, TracerApi, _Scope, forced_ids

_rand = random.getrandbits
_now = time.time_ns


class LiteSpan(SpanApi):
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
            c = self._ctx = SpanContext(self._tid, self._sid, False, SAMPLED, self._ts)
        return c

    def inject(self, headers: dict[str, str]) -> dict[str, str]:
        """W3C headers for this span, without building its SpanContext."""
        headers["traceparent"] = f"00-{self._tid:032x}-{self._sid:016x}-01"
        if self._ts:
            headers["tracestate"] = self._ts.to_header()
        return headers

    def is_recording(self) -> bool:
        return self.end_time is None

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is None:
            self.end_time = end_time or _now()
            self._tracer.batcher.add(self)

    # -- ReadableSpan's shape (for SDK exporters and tests)
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


class LiteTracer(TracerApi):
    """`start_span` for the OTel API, and `child` / `remote_child` for chainyard's helpers
    (no Context, no SpanContext, no Link objects on the way); the spans go to `batcher` when
    they end. `start_span` (the OTel API) is TracerApi's, in telemetry_lite_api."""

    span_type = LiteSpan

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
            return NonRecordingSpan(SpanContext(tid, sid, False, UNSAMPLED, ts))
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
