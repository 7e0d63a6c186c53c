"""W3C trace context in NATS headers, and the subject templates used in span names."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TP = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TP00 = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")  # the common case, checked whole
_ZERO_TID = "0" * 32
_ZERO_SID = "0" * 16
_FLAGS = [TraceFlags(i) for i in range(256)]
_FLAG_OF = {f"{i:02x}": i for i in range(256)}  # hex -> flags
_ID = re.compile(".{16}", re.S)


# -- W3C trace context ----------------------------------------------------------------------


def _state(tracestate: str | None) -> TraceState | None:
    """The `tracestate` header's value; None when absent or invalid (the trace goes on)."""
    if not tracestate:
        return None
    try:
        return TraceState.from_header([tracestate])
    except Exception:
        return None


def parse(traceparent: str | None, tracestate: str | None = None) -> SpanContext | None:
    """A remote SpanContext from W3C header values; None for anything invalid."""
    if not traceparent:
        return None
    if len(traceparent) == 55 and _TP00.fullmatch(traceparent):  # fast path: version 00
        tid, sid = traceparent[3:35], traceparent[36:52]
        if tid == _ZERO_TID or sid == _ZERO_SID:
            return None
        ts = _state(tracestate)
        return SpanContext(int(tid, 16), int(sid, 16), True, _FLAGS[int(traceparent[53:], 16)], ts)
    m = _TP.match(traceparent.strip())
    if m is None:
        return None
    version, tid, sid, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or set(tid) == {"0"} or set(sid) == {"0"}:
        return None
    ts = _state(tracestate)
    return SpanContext(
        int(tid, 16),
        int(sid, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=ts,
    )


# trace id and span id as lowercase hex (as written in traceparent), flags, TraceState or None
Ids = tuple[str, str, int, Any]


def parse_ids(traceparent: str | None, tracestate: str | None = None) -> Ids | None:
    """`parse` without building the SpanContext, the ids kept as the hex they came as: what the
    light tracer takes (it writes them back in traceparent as they are)."""
    if traceparent and len(traceparent) == 55 and _TP00.fullmatch(traceparent):
        tid, sid = traceparent[3:35], traceparent[36:52]
        if tid == _ZERO_TID or sid == _ZERO_SID:
            return None
        return tid, sid, _FLAG_OF[traceparent[53:]], _state(tracestate) if tracestate else None
    sc = parse(traceparent, tracestate)
    if sc is None:
        return None
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}", sc.trace_flags, sc.trace_state


# -- ids: random, drawn as hex ---------------------------------------------------------------
# Formatting a random 64-bit int as hex costs several times drawing it; ids are drawn in bulk as
# hex instead, a list pop each. The pool is emptied in a forked child (its ids would repeat).

_pool: list[str] = []


def _refill() -> str:
    ids = _ID.findall(os.urandom(4096).hex())  # 512 ids, cut in C
    while _ZERO_SID in ids:
        ids.remove(_ZERO_SID)
    _pool.extend(ids)
    return _pool.pop()


def new_span_id() -> str:
    """A random span id, 16 lowercase hex digits, never all zeros."""
    try:
        return _pool.pop()
    except IndexError:  # (checking first could race another thread to the last one)
        return _refill()


def new_trace_id() -> str:
    """A random trace id, 32 lowercase hex digits, never all zeros."""
    return new_span_id() + new_span_id()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.clear)


def format_traceparent(sc: SpanContext) -> str:
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags) & 0xFF:02x}"


def inject(sc: SpanContext, headers: dict[str, str]) -> dict[str, str]:
    if sc.is_valid and not sc.trace_state:
        headers[TRACEPARENT] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
    elif sc.is_valid:
        headers[TRACEPARENT] = format_traceparent(sc)
        if sc.trace_state:
            headers[TRACESTATE] = sc.trace_state.to_header()
    return headers


def header(headers: dict[str, str] | None, name: str) -> str | None:
    """A header by lowercase `name`, whatever case the sender wrote it in."""
    if not headers:
        return None
    v = headers.get(name)
    if v is None:
        for k, val in headers.items():
            if k.lower() == name:
                return val
    return v


def extract(headers: dict[str, str] | None) -> SpanContext | None:
    if not headers:
        return None
    tp = headers.get(TRACEPARENT)
    if tp is not None:  # written lowercase (OTel propagators, chainyard): tracestate too
        return parse(tp, headers.get(TRACESTATE))
    tp = header(headers, TRACEPARENT)
    return parse(tp, header(headers, TRACESTATE)) if tp else None


def extract_ids(headers: dict[str, str] | None) -> Ids | None:
    """`extract`, as `parse_ids`."""
    if not headers:
        return None
    tp = headers.get(TRACEPARENT)
    if tp is not None:
        return parse_ids(tp, headers.get(TRACESTATE))
    tp = header(headers, TRACEPARENT)
    return parse_ids(tp, header(headers, TRACESTATE)) if tp else None


def context_of(sc: SpanContext | None) -> Any:
    """An OTel Context whose current span is `sc` (an empty one, for a new trace, when None)."""
    if sc is None or not sc.is_valid:
        return otel_context.Context()
    return trace.set_span_in_context(NonRecordingSpan(sc), otel_context.Context())


# -- subjects -> low-cardinality templates ---------------------------------------------------

_TEMPLATES: dict[str, Callable[[str, list[str]], str]] = {
    "submit": lambda p, t: f"{p}.submit.{{tenant}}",
    "work": lambda p, t: f"{p}.work.{{pool}}",
    "events": lambda p, t: f"{p}.events.{{tenant}}.{{chain}}." + ".".join(t[4:]),
    "control": lambda p, t: (
        f"{p}.control.{{tenant}}.{{chain}}."
        + ("signal.{name}" if len(t) > 4 and t[4] == "signal" else ".".join(t[4:]))
    ),
    "timer": lambda p, t: f"{p}.timer.{{tenant}}.{{chain}}.{{step}}",
    "delta": lambda p, t: f"{p}.delta.{{tenant}}.{{chain}}.{{step}}",
    "cancel": lambda p, t: f"{p}.cancel.{{chain}}",
}


_CACHED = ("submit", "work")  # subjects without a chain id repeat: their templates are kept
_seen: dict[str, str] = {}
# (prefix, kind, what follows the 4th token) -> template: a template never depends on the
# tenant or chain tokens, so event subjects of different chains share an entry
_by_tail: dict[tuple[str, ...], str] = {}


def template(subject: str) -> str:
    """`cy.work.tool.search` -> `cy.work.{pool}`: the destination in span names."""
    t = _seen.get(subject)
    if t is not None:
        return t
    parts = subject.split(".", 4)
    if len(parts) < 3:
        return subject
    if parts[1] in _CACHED:
        if len(_seen) > 1024:
            _seen.clear()
        t = _seen[subject] = _TEMPLATES[parts[1]](parts[0], subject.split("."))
        return t
    key = (parts[0], parts[1], parts[4]) if len(parts) == 5 else (parts[0], parts[1])
    t = _by_tail.get(key)
    if t is not None:
        return t
    fn = _TEMPLATES.get(parts[1])
    if fn is None:
        return subject
    if len(_by_tail) > 1024:
        _by_tail.clear()
    t = _by_tail[key] = fn(parts[0], subject.split("."))
    return t
