"""Span export in a helper process: what a service's tracing costs it is making the spans.

A service's event loop shares the GIL, and its core's caches, with anything else that runs
Python in the process. Encoding and POSTing spans from a thread there cost the event loop more
than the thread's own CPU (docs/TRACING.md, "Cost"). So `ChildBatcher` keeps only the cheap
part in the service: an ended span becomes a tuple of what its protobuf needs (ids, times, the
encoded name, kind and fixed attributes, the attribute dict), a full batch is one
`marshal.dumps` written to a pipe, and a helper process (`telemetry_helper`) encodes and POSTs
it with telemetry_export's `OtlpHttpExporter`. Batching is configured like the SDK's (`OTEL_BSP_*`).

What the helper needs (endpoint, headers, timeout, compression) goes over the pipe, never on
its command line: headers carry credentials. The service never blocks on the helper: a full
pipe keeps the bytes (up to a bound, then drops whole batches and counts them), a dead helper is
replaced (at most once per `RESPAWN_S`), and its lost batches are logged. The helper ignores
SIGINT and SIGTERM and exits when the pipe closes, so a stopping service's last spans are sent.
"""

from __future__ import annotations

import collections
import logging
import marshal
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from . import telemetry_otlp as otlp
from .telemetry_export import Batching

log = logging.getLogger("chainyard.telemetry")

_LEN = struct.Struct("<I")
RESPAWN_S = 5.0  # the soonest a helper that died is replaced
MAX_PENDING = 16 << 20  # bytes a full pipe may hold back before batches are dropped
_F_SETPIPE_SZ = 1031  # Linux: a 1 MB pipe rides out the helper's pauses


class ChildExport:
    """Where the helper sends spans: an OTLP/HTTP endpoint, configured like `OtlpHttpExporter`
    (None: from the `OTEL_EXPORTER_OTLP_*` variables, read by the helper itself)."""

    def __init__(
        self,
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        compression: str | None = None,
    ) -> None:
        from .telemetry_export import traces_endpoint

        self.endpoint = endpoint or traces_endpoint()
        self.config = {
            "endpoint": self.endpoint,
            "headers": dict(headers or {}),
            "timeout": timeout,
            "compression": compression,
        }


class ChildBatcher(Batching):
    """The queue a tracer's ended spans join (same API as telemetry_export.SpanBatcher), sent
    in batches to a helper process. `exported_spans` / `failed` / `export_cpu_s` are the
    helper's counts as of the last `force_flush`."""

    thread_name = "chainyard-span-pipe"

    def __init__(self, export: ChildExport, **batch: Any) -> None:
        self._records: collections.deque[tuple[Any, ...]] = collections.deque()
        self._io = threading.Lock()  # the pipe: whole frames, one writer at a time
        self._flushing = threading.Lock()  # the helper's replies: one reader at a time
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending = b""  # bytes the pipe has not taken yet
        self._died_at = -RESPAWN_S
        self._flushes = 0
        super().__init__(export, **batch)  # also counts `dropped`: pipe full, helper down

    # -- the service's side: hot path

    def add(self, span: Any) -> None:
        """An ended span: a light one as a tuple, anything else encoded here (rare: events,
        status, links, trace state, the SDK's spans)."""
        q = self._records
        n = len(q)
        if n >= self.max_queue:
            self.dropped += 1
            return
        if type(span) in otlp.LIGHT:  # the common case, as otlp.encode tells it (inline: hot)
            if span._events is None and span._status is None and not span._ts and not span._links:
                f = span._fixed  # its encoded head, cached on the Fixed (otlp.light_head)
                head = f.heads.get(span.kind_pb) if f is not None and span.name is f.name else None
                q.append(
                    (
                        span._tracer.group,
                        span._tid,
                        span._sid,
                        span._pid,
                        span._premote,
                        span._plink,
                        head or otlp.light_head(span),
                        span._attrs,
                        span.start_time,
                        span.end_time or 0,
                    )
                )
            else:
                self._encoded(span, span.otlp)
        else:
            self._encoded(span, lambda: otlp.sdk_record(span))
        if n + 1 >= self.max_batch:
            self._send(self._take(self.max_batch))

    def _encoded(self, span: Any, encode: Any) -> None:
        """A span beyond the common case, encoded here; one that cannot be (a string that is
        not valid Unicode in its events or status) is dropped and counted, never raised into
        the code that ended it."""
        try:
            self._records.append(encode())
        except Exception as e:
            self.dropped += 1
            log.warning("span %r dropped: %r", getattr(span, "name", "?"), e)

    def _take(self, n: int) -> list[tuple[Any, ...]]:
        q = self._records
        pop = q.popleft
        return [pop() for _ in range(min(n, len(q)))]

    def _send(self, records: list[tuple[Any, ...]]) -> None:
        if not records:
            return
        try:
            frame = marshal.dumps(records)
        except ValueError:  # an attribute value of a type marshal does not know (a str subclass)
            frame = marshal.dumps([with_attrs(r, _plain_value) for r in records])
        with self._io:
            if len(self._pending) > MAX_PENDING:
                self.dropped += len(records)
                return
            self._write(_LEN.pack(len(frame)) + frame, len(records))

    # -- the pipe (under self._io)

    def _write(self, data: bytes, spans: int, *, block: bool = False) -> bool:
        proc = self._proc if self._proc is not None else self._spawn()
        if proc is None or proc.stdin is None:
            self.dropped += spans
            return False
        fd = proc.stdin.fileno()
        data = self._pending + data if self._pending else data
        try:
            if block:
                os.set_blocking(fd, True)
                while data:
                    data = data[os.write(fd, data) :]
                os.set_blocking(fd, False)
            else:
                data = data[os.write(fd, data) :]
        except BlockingIOError:
            pass
        except OSError as e:  # the helper is gone: its unsent batches with it
            log.warning("span export helper exited (%s); replacing it", e)
            self._reap()
            self.dropped += spans
            return False
        self._pending = data
        return True

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        """Start the helper; None (and its spans dropped) while it cannot be: a span's end
        must never fail the handler that ended it."""
        if self._stop or time.monotonic() - self._died_at < RESPAWN_S:
            return None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "chainyard.runtime.telemetry_helper"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        except OSError as e:
            log.error("cannot start the span export helper (%s); spans are dropped", e)
            self._died_at = time.monotonic()
            return None
        assert proc.stdin is not None
        self._proc, self._pending = proc, b""
        fd = proc.stdin.fileno()
        try:
            import fcntl

            fcntl.fcntl(fd, _F_SETPIPE_SZ, 1 << 20)
        except (ImportError, OSError):
            pass
        config = marshal.dumps(self.exporter.config)
        try:
            os.write(fd, _LEN.pack(len(config)) + config)  # a fresh pipe takes it whole
        except OSError as e:
            log.warning("span export helper exited at once (%s)", e)
            self._reap()
            return None
        os.set_blocking(fd, False)
        return proc

    def _reap(self) -> None:
        proc, self._proc, self._pending = self._proc, None, b""
        self._died_at = time.monotonic()
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                try:
                    f and f.close()
                except OSError:
                    pass
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- the schedule delay, flush, shutdown

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.delay)
            self._wake.clear()
            while self._records:
                self._send(self._take(self.max_batch))
            if self._pending:
                with self._io:
                    self._write(b"", 0)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Send what is queued and wait until the helper has posted it (or the timeout). The
        pipe is held only to write: the service's batches keep flowing while this waits."""
        while self._records:
            self._send(self._take(self.max_batch))
        deadline = time.monotonic() + timeout_millis / 1000
        with self._flushing:
            with self._io:
                if self._proc is None:
                    return not self._pending
                self._flushes += 1
                token = self._flushes
                mark = marshal.dumps(("flush", token))
                if not self._write(_LEN.pack(len(mark)) + mark, 0, block=True):
                    return False
                proc = self._proc
            try:
                return self._await_reply(proc, token, deadline)
            except (OSError, ValueError):  # the helper went away meanwhile
                return False

    def _await_reply(self, proc: Any, token: int, deadline: float) -> bool:
        out = proc.stdout.fileno()
        line = b""
        while True:
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([out], [], [], left)[0]:
                    return False
                chunk = os.read(out, 256)
                if not chunk:
                    return False
                line += chunk
            for reply in line.decode().splitlines():
                got, exported, failed, cpu = reply.split()
                self.exported_spans, self.failed = int(exported), int(failed)
                self.export_cpu_s = float(cpu)
                if int(got) == token:
                    return True
            line = b""  # replies to earlier flushes that timed out

    def shutdown(self) -> None:
        if self._stop:
            return
        flushed = self.force_flush(5000)
        self._stop = True
        self._wake.set()
        with self._io:
            proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()  # the helper sends what it has, then exits
            try:
                proc.wait(5 if flushed else 0.5)  # a helper that could not flush is stuck
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def _after_fork(self) -> None:
        self._records.clear()
        self._io, self._flushing = threading.Lock(), threading.Lock()
        proc, self._proc, self._pending = self._proc, None, b""
        if proc is not None:  # the parent's helper is the parent's: let go of its pipes here
            for f in (proc.stdin, proc.stdout):
                try:
                    f and f.close()
                except OSError:
                    pass
        super()._after_fork()


def with_attrs(record: tuple[Any, ...], fn: Any) -> tuple[Any, ...]:
    """A light span's record with `fn` applied to its attribute keys and values (any other
    record, already encoded, as it is)."""
    if len(record) != 10 or not record[7]:
        return record
    attrs = {fn(k): fn(v) for k, v in record[7].items()}
    return (*record[:7], attrs, *record[8:])


def _plain_value(v: Any) -> Any:
    """`v` as one of marshal's types (str, int, float and bool subclasses, tuples and other
    sequences made plain)."""
    for t in (bool, int, float, str, bytes):
        if isinstance(v, t):
            return t(v)
    if isinstance(v, (list, tuple)):
        return [_plain_value(x) for x in v]
    return None if v is None else str(v)
