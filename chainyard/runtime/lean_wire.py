"""NATS headers on the wire as nats-py writes and reads them, for less CPU a message.

nats-py matches every header name against a regex on every publish and tests every character of
every received name for whitespace: per message, per header. A traceparent header made that a
measurable share of a traced message's cost (docs/TRACING.md). Here each distinct name is checked
once and remembered; the bytes written and the dicts read are nats-py's own (tests/test_lean_nats.py
compares them).
"""

from __future__ import annotations

from nats import errors as nats_errors
from nats.aio import client as nats_client
from nats.aio.client import _HEADER_KEY_RE, _HEADER_VALUE_NEWLINES, Client, _validate_subject

_out_names: dict[str, str] = {}  # a header name as given -> as written (stripped, checked)
_in_names: dict[bytes, str | None] = {}  # a received name -> its key, None when invalid


def header_block(headers: dict[str, str]) -> bytes:
    """The header block nats-py's `Client._send_publish` writes for `headers`, byte for byte,
    matching each name against its token regex once rather than on every message."""
    out = "NATS/1.0\r\n"
    for k, v in headers.items():
        key = _out_names.get(k)
        if key is None:
            key = k.strip()
            if key and not _HEADER_KEY_RE.fullmatch(key):
                raise nats_errors.BadHeaderError(key)
            if len(_out_names) < 1024:
                _out_names[k] = key
        if not key:
            continue
        if "\r" in v or "\n" in v:  # never a line break inside a value
            v = v.translate(_HEADER_VALUE_NEWLINES)
        out += f"{key}: {v.strip()}\r\n"
    return (out + "\r\n").encode()


async def publish_with_headers(
    nc: Client, subject: str, reply: str, payload: bytes, headers: dict[str, str]
) -> None:
    """`nc.publish(subject, payload, reply=reply, headers=headers)`: the same checks, errors,
    bytes and statistics, with the header block from `header_block`."""
    if not nc._skip_subject_validation:
        _validate_subject(subject)
        if reply:
            _validate_subject(reply)
    if nc.is_closed:
        raise nats_errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats_errors.ConnectionDrainingError
    size = len(payload)
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size
    ):
        raise nats_errors.OutboundBufferLimitError
    if size > nc._max_payload:
        raise nats_errors.MaxPayloadError
    hdr = header_block(headers)
    n = len(hdr)
    cmd = f"HPUB {subject} {reply} {n} {n + size}\r\n".encode() + hdr + payload + b"\r\n"
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += size
    await nc._send_command(cmd)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's `Client._parse_header_lines`, with each distinct name decoded and checked for
    whitespace once (nats-py tests every character of every name of every message)."""
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = _in_names.get(name, False)
        if key is False:
            key = _in_name(name)
        if key is not None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


def _in_name(name: bytes) -> str | None:
    try:
        key: str | None = name.strip().decode("ascii")
    except UnicodeDecodeError:
        key = None
    if key is not None and any(c.isspace() for c in key):
        key = None
    if len(_in_names) > 1024:
        _in_names.clear()
    _in_names[name] = key
    return key


def lean_headers(nc: Client) -> None:
    """Parse the connection's received headers with `parse_header_lines` (status lines and all
    else stay nats-py's). Not when nats-py uses fast_mail_parser, whose results differ."""
    if getattr(nats_client, "parse_email", None) is None:
        nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]
