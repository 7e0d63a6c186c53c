"""OTLP protobuf beyond chainyard's common span: the general Span encoder (trace state, events,
links, status), the SDK's ReadableSpans, and the resource and scope fields. The writer and the
common case's fast path are in telemetry_otlp, which re-exports these names."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from .telemetry_otlp import (
    _FLAGS,
    _NAMES,
    _T_ATTR,
    _T_END,
    _T_EV_ATTR,
    _T_EV_NAME,
    _T_EV_TIME,
    _T_EVENT,
    _T_FLAGS,
    _T_LINK,
    _T_LK_ATTR,
    _T_LK_FLAGS,
    _T_LK_TSTATE,
    _T_PSID,
    _T_RES_ATTR,
    _T_RS_RES,
    _T_SC_ATTR,
    _T_SC_NAME,
    _T_SC_VER,
    _T_SID,
    _T_SS_SCOPE,
    _T_ST_CODE,
    _T_ST_MSG,
    _T_START,
    _T_STATUS,
    _T_TID,
    _T_TSTATE,
    _VARINT,
    _ld,
    _name_kind,
    _pack_q,
    attributes,
)

_pack_ids = struct.Struct(">2sQQ2sQ").pack  # trace id, span id: big-endian bytes on the wire
_pack_pid = struct.Struct(">2sQ").pack
_pack_times = struct.Struct("<cQcQ").pack  # start, end: fixed64
_M64 = (1 << 64) - 1
_SPAN_FLAGS = (_T_FLAGS + _FLAGS[0], _T_FLAGS + _FLAGS[1])
_LINK_FLAGS = (_T_LK_FLAGS + _FLAGS[0], _T_LK_FLAGS + _FLAGS[1])


def encode_span(
    trace_id: int,
    span_id: int,
    parent_id: int,
    remote_parent: bool,
    trace_state: str,
    name: str,
    kind: int,
    start: int,
    end: int,
    attrs: Mapping[str, Any] | None,
    events: Sequence[tuple[int, str, Mapping[str, Any] | None]] | None,
    links: Sequence[tuple[int, int, str, Mapping[str, Any] | None, bool]] | None,
    status_code: int,
    status_message: str,
    fixed: bytes = b"",
) -> bytes:
    """One `Span` message body. `kind` is the protobuf value (INTERNAL 1 ... CONSUMER 5);
    `fixed`, attributes already encoded (`Fixed.pb`)."""
    parts = [_pack_ids(_T_TID, trace_id >> 64, trace_id & _M64, _T_SID, span_id)]
    if trace_state:
        parts.append(_ld(_T_TSTATE, trace_state.encode()))
    if parent_id:
        parts.append(_pack_pid(_T_PSID, parent_id))
    parts.append(_NAMES.get((name, kind)) or _name_kind(name, kind))
    parts.append(_pack_times(_T_START, start, _T_END, end))
    if fixed:
        parts.append(fixed)
    if attrs:
        parts += attributes(_T_ATTR, attrs)
    if events:
        for t, ename, eattrs in events:
            body = [_T_EV_TIME, _pack_q(t), _ld(_T_EV_NAME, ename.encode())]
            body += attributes(_T_EV_ATTR, eattrs)
            parts.append(_ld(_T_EVENT, b"".join(body)))
    if links:
        for ltid, lsid, lstate, lattrs, lremote in links:
            body = [_pack_ids(_T_TID, ltid >> 64, ltid & _M64, _T_SID, lsid)]
            if lstate:
                body.append(_ld(_T_LK_TSTATE, lstate.encode()))
            if lattrs:
                body += attributes(_T_LK_ATTR, lattrs)
            body.append(_LINK_FLAGS[lremote])
            parts.append(_ld(_T_LINK, b"".join(body)))
    if status_code:
        st = _T_ST_CODE + _VARINT[status_code]
        if status_message:
            st = _ld(_T_ST_MSG, status_message.encode()) + st
        parts.append(_ld(_T_STATUS, st))
    parts.append(_SPAN_FLAGS[remote_parent])
    return b"".join(parts)


def encode_resource(attrs: Mapping[str, Any]) -> bytes:
    """The `resource` field of ResourceSpans (tag included)."""
    return _ld(_T_RS_RES, b"".join(attributes(_T_RES_ATTR, attrs)))


def encode_scope(
    name: str, version: str | None = None, attrs: Mapping[str, Any] | None = None
) -> bytes:
    """The `scope` field of ScopeSpans (tag included)."""
    body = [_ld(_T_SC_NAME, name.encode())]
    if version:
        body.append(_ld(_T_SC_VER, version.encode()))
    body += attributes(_T_SC_ATTR, attrs)
    return _ld(_T_SS_SCOPE, b"".join(body))


# -- spans of either kind -> (resource, scope, span bytes) ------------------------------------

_SDK_KIND = {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}  # opentelemetry.trace.SpanKind.value -> protobuf
_res_cache: dict[int, tuple[Any, bytes]] = {}
_scope_cache: dict[tuple[str, str | None], bytes] = {}


def _resource_bytes(resource: Any) -> bytes:
    hit = _res_cache.get(id(resource))
    if hit is None or hit[0] is not resource:
        attrs = dict(resource.attributes) if resource is not None else {}
        hit = _res_cache[id(resource)] = (resource, encode_resource(attrs))
    return hit[1]


def _scope_bytes(scope: Any) -> bytes:
    name = getattr(scope, "name", "") if scope is not None else ""
    version = getattr(scope, "version", None) if scope is not None else None
    hit = _scope_cache.get((name, version))
    if hit is None:
        attrs = getattr(scope, "attributes", None) if scope is not None else None
        hit = _scope_cache[(name, version)] = encode_scope(name, version, attrs)
    return hit


def _state(ts: Any) -> str:
    return ts.to_header() if ts else ""


def encode_sdk_span(s: Any) -> bytes:
    """A ReadableSpan (the SDK's) -> Span bytes."""
    sc = s.context
    parent = s.parent
    status = s.status
    return encode_span(
        sc.trace_id,
        sc.span_id,
        parent.span_id if parent else 0,
        bool(parent is not None and parent.is_remote),
        _state(sc.trace_state),
        s.name,
        _SDK_KIND[s.kind.value],
        s.start_time or 0,
        s.end_time or 0,
        s.attributes,
        [(e.timestamp, e.name, e.attributes) for e in s.events] if s.events else None,
        [
            (
                lk.context.trace_id,
                lk.context.span_id,
                _state(lk.context.trace_state),
                lk.attributes,
                bool(lk.context.is_remote),
            )
            for lk in s.links
        ]
        if s.links
        else None,
        status.status_code.value if status is not None else 0,
        (status.description or "") if status is not None else "",
    )
