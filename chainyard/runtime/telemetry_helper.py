"""The span export helper: `python -m chainyard.runtime.telemetry_helper`, started by
telemetry_child.ChildBatcher with a pipe on its stdin. The first frame is its configuration
(endpoint, headers, timeout, compression), then batches of span records and flush marks; it
encodes each batch with telemetry_otlp and POSTs it with telemetry_export.OtlpHttpExporter, and
answers a flush mark on stdout once everything before it is posted. It ignores SIGINT and
SIGTERM and ends at EOF: the service decides when it ends, and its last spans are sent.
"""

from __future__ import annotations

import collections
import logging
import marshal
import os
import re
import signal
import threading
import time
from typing import Any

from . import telemetry_otlp as otlp
from .telemetry_child import _LEN, with_attrs

log = logging.getLogger("chainyard.telemetry")
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_FRAMES = 64  # batches held while the endpoint is slow; older ones are dropped


def _frames(fd: int, out: collections.deque[bytes | None], ready: threading.Condition) -> None:
    """Read length-prefixed frames off the pipe as fast as they come (the service never waits
    on the encoder); None at the end."""
    buf = b""
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        buf = buf + chunk if buf else chunk
        frames, at = [], 0
        while len(buf) - at >= 4:
            (n,) = _LEN.unpack_from(buf, at)
            if len(buf) - at < 4 + n:
                break
            frames.append(buf[at + 4 : at + 4 + n])
            at += 4 + n
        buf = buf[at:]
        with ready:
            out.extend(frames)
            ready.notify()
    with ready:
        out.append(None)
        ready.notify()


def encode_records(records: list[tuple[Any, ...]]) -> bytes:
    """The ExportTraceServiceRequest of a batch of `ChildBatcher` records. A string that is not
    valid Unicode (a lone surrogate, say, from bytes decoded with `surrogateescape`) is sent
    with U+FFFD in its place: OTLP strings are UTF-8."""
    try:
        return _encode(records)
    except UnicodeEncodeError:
        return _encode([with_attrs(r, _utf8) for r in records])


def _encode(records: list[tuple[Any, ...]]) -> bytes:
    groups: dict[Any, list[bytes]] = {}
    for r in records:
        if len(r) == 2:
            group, body = r
        else:
            group, body = r[0], otlp.encode_record(*r[1:])
        otlp.add_span(groups.get(group) or groups.setdefault(group, []), body)
    return otlp.request(groups)


def _utf8(v: Any) -> Any:
    if type(v) is str:
        return _SURROGATE.sub("\ufffd", v)
    if type(v) is list:
        return [_utf8(x) for x in v]
    return v


def _post(exporter: Any, records: list[tuple[Any, ...]]) -> bool:
    try:
        return bool(exporter.post(encode_records(records)))
    except Exception as e:  # one bad batch must not end the helper
        log.warning("a batch of %d spans could not be sent: %r", len(records), e)
        return False


def main() -> None:
    """The helper: the first frame is its configuration, then batches and flush marks."""
    from .telemetry_export import OtlpHttpExporter

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the service decides when it ends: EOF
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    frames: collections.deque[bytes | None] = collections.deque()
    ready = threading.Condition()
    threading.Thread(target=_frames, args=(0, frames, ready), daemon=True).start()
    exporter: OtlpHttpExporter | None = None
    exported = failed = 0
    while True:
        with ready:
            while not frames:
                ready.wait()
            frame = frames.popleft()
            behind = len(frames) > MAX_FRAMES  # the endpoint is slower than the spans come
        if frame is None:
            break
        msg = marshal.loads(frame)
        if exporter is None:
            exporter = OtlpHttpExporter(**msg)
        elif type(msg) is tuple:  # ("flush", token): everything before it is posted
            reply = f"{msg[1]} {exported} {failed} {time.process_time():.6f}\n"
            os.write(1, reply.encode())
        elif not behind and _post(exporter, msg):
            exported += len(msg)
        else:
            failed += len(msg)
    if exporter is not None:
        exporter.shutdown()


if __name__ == "__main__":
    main()
