"""OTLP protobuf for spans, written without the SDK's generic encoder.

`encode` writes an `ExportTraceServiceRequest` directly with a small varint / length-delimited
writer (the SDK's encoder builds a pb2 object per span, attribute and value first: ~95 us a span
on the 2-core bench box; this is ~10x cheaper, see docs/TRACING.md). It takes chainyard's light
spans (`telemetry_lite.LiteSpan`) and the SDK's `ReadableSpan`s alike, grouped by resource and
instrumentation scope. The wire format is checked by decoding with opentelemetry-proto in
tests/test_tracing_export.py. The batching thread and the HTTP exporter that send these bytes
are in telemetry_export.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# -- protobuf writer --------------------------------------------------------------------------

_VARINT = [bytes((i,)) for i in range(128)] + [
    bytes((i & 0x7F | 0x80, i >> 7)) for i in range(128, 1 << 14)
]
_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack


def varint(n: int) -> bytes:
    if n < 16384:
        if n >= 0:
            return _VARINT[n]
    if n < 0:
        n &= (1 << 64) - 1  # int64: two's complement, ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, length, body."""
    n = len(body)
    return tag + (_VARINT[n] if n < 16384 else varint(n)) + body


# field tags: (number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)
_T_RS = b"\x0a"  # ExportTraceServiceRequest.resource_spans = 1
_T_RS_RES = b"\x0a"  # ResourceSpans.resource = 1
_T_RS_SS = b"\x12"  # ResourceSpans.scope_spans = 2
_T_RES_ATTR = b"\x0a"  # Resource.attributes = 1
_T_SS_SCOPE = b"\x0a"  # ScopeSpans.scope = 1
_T_SS_SPAN = b"\x12"  # ScopeSpans.spans = 2
_T_SC_NAME = b"\x0a"  # InstrumentationScope.name = 1
_T_SC_VER = b"\x12"  # .version = 2
_T_SC_ATTR = b"\x1a"  # .attributes = 3
# Span: trace_id 1, span_id 2, trace_state 3, parent_span_id 4, name 5, kind 6, start 7 (fixed64),
# end 8 (fixed64), attributes 9, events 11, links 13, status 15, flags 16 (fixed32)
_T_TID = b"\x0a\x10"
_T_SID = b"\x12\x08"
_T_TSTATE = b"\x1a"
_T_PSID = b"\x22\x08"
_T_NAME = b"\x2a"
_T_KIND = b"\x30"
_T_START = b"\x39"
_T_END = b"\x41"
_T_ATTR = b"\x4a"
_T_EVENT = b"\x5a"
_T_LINK = b"\x6a"
_T_STATUS = b"\x7a"
_T_FLAGS = b"\x85\x01"
# Event: time 1 (fixed64), name 2, attributes 3. Link: trace_id 1, span_id 2, trace_state 3,
# attributes 4, flags 6 (fixed32). Status: message 2, code 3.
_T_EV_TIME = b"\x09"
_T_EV_NAME = b"\x12"
_T_EV_ATTR = b"\x1a"
_T_LK_TSTATE = b"\x1a"
_T_LK_ATTR = b"\x22"
_T_LK_FLAGS = b"\x35"
_T_ST_MSG = b"\x12"
_T_ST_CODE = b"\x18"
# KeyValue: key 1, value 2. AnyValue: string 1, bool 2, int 3, double 4 (fixed64), array 5
_T_KEY = b"\x0a"
_T_VAL = b"\x12"

HAS_IS_REMOTE = 0x100  # SpanFlags: the context's is_remote is known ...
IS_REMOTE = 0x200  # ... and true
_FLAGS = (_pack_i(HAS_IS_REMOTE), _pack_i(HAS_IS_REMOTE | IS_REMOTE))


def any_value(v: Any) -> bytes:
    """An AnyValue's body."""
    t = type(v)
    if t is str:
        b = v.encode()
        return _ld(b"\x0a", b)
    if t is bool:
        return b"\x10\x01" if v else b"\x10\x00"
    if t is int:
        return b"\x18" + varint(v)
    if t is float:
        return b"\x21" + _pack_d(v)
    if isinstance(v, (list, tuple)):
        return _ld(b"\x2a", b"".join(_ld(b"\x0a", any_value(x)) for x in v))
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, int):
        return b"\x18" + varint(int(v))
    if isinstance(v, float):
        return b"\x21" + _pack_d(float(v))
    if isinstance(v, bytes):
        return _ld(b"\x3a", v)
    if isinstance(v, Sequence) and not isinstance(v, str):
        return any_value(list(v))
    return any_value(str(v))


_KEYS: dict[str, bytes] = {}
# field tag -> {(key, value, type): the whole KeyValue field}, for values that repeat
_PAIRS: dict[bytes, dict[tuple[str, Any, type], bytes]] = {}


def _key(key: str) -> bytes:
    """A KeyValue's key field."""
    kb = _KEYS.get(key)
    if kb is None:
        if len(_KEYS) > 4096:
            _KEYS.clear()
        kb = _KEYS[key] = _ld(_T_KEY, key.encode())
    return kb


def key_value(key: str, v: Any) -> bytes:
    """One KeyValue as a length-delimited field body (without the outer tag)."""
    return _key(key) + _ld(_T_VAL, any_value(v))


def attributes(tag: bytes, attrs: Mapping[str, Any] | None) -> list[bytes]:
    """Repeated KeyValue fields. Pairs seen before (messaging.system=nats, ...) come from a
    cache; values that are mostly unique (ids) are encoded each time."""
    if not attrs:
        return []
    out = []
    pairs = _PAIRS.get(tag)
    if pairs is None:
        pairs = _PAIRS[tag] = {}
    for k, v in attrs.items():
        if v is None:
            continue
        t = type(v)
        if t is str or t is bool or t is int:
            hit = pairs.get((k, v, t))  # the type: True == 1
            if hit is not None:
                out.append(hit)
                continue
            if t is str:
                kb = _KEYS.get(k) or _key(k)
                vb = v.encode()
                n = len(vb)
                m = len(kb) + n + 4  # key field, value tag and length, string tag and length
                if n < 125 and m < 128:  # every length fits one byte
                    hit = b"".join(
                        (tag, _VARINT[m], kb, b"\x12", _VARINT[n + 2], b"\x0a", _VARINT[n], vb)
                    )
                else:
                    hit = _ld(tag, kb + _ld(_T_VAL, _ld(b"\x0a", vb)))
            else:
                hit = _ld(tag, key_value(k, v))
            if len(pairs) > 8192:
                pairs.clear()
            pairs[(k, v, t)] = hit
            out.append(hit)
        else:
            out.append(_ld(tag, key_value(k, v)))
    return out


_NAMES: dict[tuple[str, int], bytes] = {}
_KINDS = [_T_KIND + bytes((k,)) for k in range(6)]


def _name_kind(name: str, kind: int) -> bytes:
    """The name and kind fields, cached: span names are low-cardinality templates."""
    b = _NAMES.get((name, kind))
    if b is None:
        if len(_NAMES) > 4096:
            _NAMES.clear()
        b = _NAMES[(name, kind)] = _ld(_T_NAME, name.encode()) + _KINDS[kind]
    return b


class Fixed:
    """Span attributes that repeat from span to span (the messaging system and operation, a
    consumer group, a model and its deployment), encoded once: a span that carries a `Fixed`
    costs one bytes append for them at export instead of a lookup per attribute. `name` is the
    span name that goes with them (`send cy.work.{pool}`), formatted once too."""

    __slots__ = ("heads", "items", "name", "pb")

    def __init__(self, name: str, items: dict[str, Any]) -> None:
        self.name = name
        self.items = items
        self.pb = b"".join(attributes(_T_ATTR, items))
        self.heads: dict[int, bytes] = {}  # kind -> name, kind and these attributes, encoded

    def head(self, kind: int) -> bytes:
        h = self.heads[kind] = _name_kind(self.name, kind) + self.pb
        return h


_pack_times_flags = struct.Struct("<cQcQ2sI").pack  # start, end (fixed64), the span's flags
# key -> [everything of a span attribute with that key and a string value of n bytes, up to the
# value itself (tag, lengths, key): one list item per value length, filled as lengths are seen]
_STR_PREFIX: dict[str, list[bytes | None]] = {}
_INT_PREFIX: dict[str, bytes] = {}  # key -> the same for a small int value


def _str_prefix(key: str, n: int) -> bytes | None:
    pre = _STR_PREFIX.get(key)
    if pre is None:
        if len(_STR_PREFIX) > 4096:
            _STR_PREFIX.clear()
        pre = _STR_PREFIX[key] = [None] * 128
    kb = _key(key)
    if len(kb) + n + 4 >= 128:  # lengths of two bytes: the general path
        return None
    b = pre[n] = b"".join(
        (_T_ATTR, _VARINT[len(kb) + n + 4], kb, b"\x12", _VARINT[n + 2], b"\x0a", _VARINT[n])
    )
    return b


def _num_prefix(key: str, kind: int) -> bytes:
    """Everything of a span attribute with this key and a double (kind 0) or an int of `kind`
    varint bytes (1 or 2) up to the value itself."""
    hit = _NUM_PREFIX.get((key, kind))
    if hit is None:
        if len(_NUM_PREFIX) > 4096:
            _NUM_PREFIX.clear()
        kb = _key(key)
        if kind == 0:  # KeyValue: key, value tag, AnyValue length 9: double tag, 8 bytes
            hit = _T_ATTR + _VARINT[len(kb) + 11] + kb + b"\x12\x09\x21"
        else:  # ... AnyValue: int tag, `kind` varint bytes
            hit = _T_ATTR + _VARINT[len(kb) + 3 + kind] + kb + b"\x12" + _VARINT[1 + kind] + b"\x18"
        _NUM_PREFIX[(key, kind)] = hit
    return hit


_NUM_PREFIX: dict[tuple[str, int], bytes] = {}
_LISTS: dict[tuple[str, tuple[Any, ...]], bytes] = {}  # (key, values) -> the whole field


def _add_span_attributes(parts: list[bytes], attrs: Mapping[str, Any]) -> None:
    """Append a span's attributes (repeated KeyValue fields) to `parts`: a string, an int below
    16384 or a float, nearly all of chainyard's own values, as two items (its tag, lengths and
    key, then the value) with no join or lookup by value; a short list (finish reasons) from a
    cache."""
    for k, v in attrs.items():
        t = type(v)
        if t is str:
            vb = v.encode()
            n = len(vb)
            if n < 128:
                pre = _STR_PREFIX.get(k)
                b = pre[n] if pre is not None else None
                if b is None:
                    b = _str_prefix(k, n)
                if b is not None:
                    parts += (b, vb)
                    continue
        elif t is int and 0 <= v < 16384:
            b = _INT_PREFIX.get(k) if v < 128 else None
            if b is None:
                b = _num_prefix(k, 1 if v < 128 else 2)
                if v < 128:
                    if len(_INT_PREFIX) > 4096:
                        _INT_PREFIX.clear()
                    _INT_PREFIX[k] = b
            parts += (b, _VARINT[v])
            continue
        elif t is float:
            parts += (_NUM_PREFIX.get((k, 0)) or _num_prefix(k, 0), _pack_d(v))
            continue
        elif t is list and len(v) < 8:
            key = (k, tuple(v))
            try:
                b = _LISTS.get(key)
            except TypeError:  # unhashable items
                b = key = None  # type: ignore[assignment]
            if b is None:
                b = _ld(_T_ATTR, key_value(k, v))
                if key is not None:
                    if len(_LISTS) > 4096:
                        _LISTS.clear()
                    _LISTS[key] = b
            parts.append(b)
            continue
        elif v is None:
            continue
        parts.append(_ld(_T_ATTR, key_value(k, v)))


_fromhex = bytes.fromhex
# a link to the span's parent: its tag and length, the trace id's tag (hex; the ids follow), and
# after the ids its flags (fixed32 0x100 or 0x300), by whether the parent is remote
_LINK_HEX = "6a210a10"
_LINK_FLAGS_HEX = ("3500010000", "3500030000")
_SPAN_FLAGS_PB = (HAS_IS_REMOTE, HAS_IS_REMOTE | IS_REMOTE)


def light_head(s: Any) -> bytes:
    """A light span's name, kind and fixed attributes, encoded (cached on its `Fixed`)."""
    kind, fixed = s.kind_pb, s._fixed
    if fixed is not None and s.name is fixed.name:
        return fixed.heads.get(kind) or fixed.head(kind)
    return _name_kind(s.name, kind) + (fixed.pb if fixed is not None else b"")


def encode_record(
    tid: str,
    sid: str,
    pid: str,
    premote: bool,
    plink: bool,
    head: bytes,
    attrs: dict[str, Any] | None,
    start: int,
    end: int,
) -> bytes:
    """A Span body for the common case of chainyard's spans: no trace state, events or status,
    no link but one to its parent (a process span's creation context). The ids come as hex:
    the id fields (and the link) are written as one hex string, tags included, and turned into
    bytes at once. `head` is `light_head`'s."""
    if not pid:
        ids = f"0a10{tid}1208{sid}"
    elif plink:
        lf = _LINK_FLAGS_HEX[premote]
        ids = f"0a10{tid}1208{sid}2208{pid}{_LINK_HEX}{tid}1208{pid}{lf}"
    else:
        ids = f"0a10{tid}1208{sid}2208{pid}"
    parts = [
        _fromhex(ids),
        head,
        _pack_times_flags(_T_START, start, _T_END, end, _T_FLAGS, _SPAN_FLAGS_PB[premote]),
    ]
    if attrs:
        _add_span_attributes(parts, attrs)
    return b"".join(parts)


def encode_light(s: Any) -> bytes:
    """`encode_record` for a light span (a telemetry_lite.LiteSpan, read by its slots)."""
    return encode_record(
        s._tid,
        s._sid,
        s._pid,
        s._premote,
        s._plink,
        light_head(s),
        s._attrs,
        s.start_time,
        s.end_time or 0,
    )


# span types `encode_light` takes (telemetry_lite's); such a span has `_tracer.group`, its
# resource and scope bytes, and `otlp()` when it needs more than the common case
LIGHT: set[type] = set()


def encode(spans: Iterable[Any]) -> bytes:
    """An ExportTraceServiceRequest for `spans` (light spans and SDK ReadableSpans)."""
    groups: dict[tuple[bytes, bytes], list[bytes]] = {}
    key: Any = None
    parts: list[bytes] = []
    light = LIGHT
    for s in spans:
        if type(s) in light:
            if s._events is None and s._status is None and not s._ts and not s._links:
                k, body = s._tracer.group, encode_light(s)  # nearly every span
            else:
                k, body = s.otlp()
        else:
            k, body = sdk_record(s)
        if k is not key:  # spans come in runs from one tracer
            key = k
            parts = groups.get(k) or groups.setdefault(k, [])
        add_span(parts, body)
    return request(groups)


def sdk_record(s: Any) -> tuple[tuple[bytes, bytes], bytes]:
    """((resource field, scope field), Span body) of an SDK ReadableSpan."""
    return (_resource_bytes(s.resource), _scope_bytes(s.instrumentation_scope)), encode_sdk_span(s)


def add_span(parts: list[bytes], body: bytes) -> None:
    """Append one Span body, as a ScopeSpans.spans field, to a group's parts."""
    n = len(body)
    parts += (_T_SS_SPAN, _VARINT[n] if n < 16384 else varint(n), body)


def request(groups: Mapping[tuple[bytes, bytes], list[bytes]]) -> bytes:
    """The ExportTraceServiceRequest of spans grouped by (resource, scope) field bytes."""
    by_resource: dict[bytes, list[bytes]] = {}
    for (res, scope), bodies in groups.items():
        by_resource.setdefault(res, []).append(_ld(_T_RS_SS, scope + b"".join(bodies)))
    return b"".join(_ld(_T_RS, res + b"".join(ss)) for res, ss in by_resource.items())


# the general encoder (events, status, links, trace state), SDK spans, resource and scope fields
from .telemetry_otlp_span import (  # noqa: E402, F401 - it uses this module's writer; re-exported
    _resource_bytes,
    _scope_bytes,
    encode_resource,
    encode_scope,
    encode_sdk_span,
    encode_span,
)
