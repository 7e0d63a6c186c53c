"""Getting ended spans out of the process: the batching thread and the OTLP/HTTP exporter.

`SpanBatcher` is the queue the tracer's spans join when they end (telemetry_lite, and the SDK's
spans through `span_processor()`), drained by a thread in batches configured like the SDK's
BatchSpanProcessor (`OTEL_BSP_*`). `OtlpHttpExporter` encodes a batch with telemetry_otlp and
POSTs it with http.client on a kept-alive connection, configured like the SDK's exporter by
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`
(+ `/v1/traces`), `..._HEADERS`, `..._TIMEOUT` (seconds, as the Python SDK reads it),
`..._COMPRESSION` (`gzip`; none by default) and `..._CERTIFICATE`. It is also a `SpanExporter`
(export / shutdown / force_flush), so an SDK BatchSpanProcessor can use it.
"""

from __future__ import annotations

import atexit
import collections
import gzip
import http.client
import logging
import os
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from .telemetry_otlp import encode

log = logging.getLogger("chainyard.telemetry")


def _int_env(name: str, default: int) -> int:
    try:
        v = int(os.environ.get(name, "") or default)
        return v if v > 0 else default
    except ValueError:
        return default


class Batching:
    """What both span batchers share: the `OTEL_BSP_*` settings (or the arguments given), the
    counts, a thread woken by a full batch or the schedule delay (`_run`), and a fresh start in a
    forked child (`_after_fork`) and a flush at exit (`shutdown`)."""

    thread_name = "chainyard-span-export"

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
        self._stop = False
        self._wake = threading.Event()
        self.dropped = 0  # spans dropped here (a full queue)
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
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        self._wake = threading.Event()
        if not self._stop:
            self._start()

    def _run(self) -> None:
        raise NotImplementedError

    def add(self, span: Any) -> None:
        raise NotImplementedError

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def span_processor(self) -> Any:
        return span_processor(self)


class SpanBatcher(Batching):
    """A queue of ended spans and the thread that exports them in batches.

    Like the SDK's BatchSpanProcessor, configured by the same variables: `OTEL_BSP_MAX_QUEUE_SIZE`
    (2048; spans beyond it are dropped and counted), `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (512; a full
    batch wakes the thread), `OTEL_BSP_SCHEDULE_DELAY` (ms, 5000: the longest a span waits),
    `OTEL_BSP_EXPORT_TIMEOUT`. `exporter` needs `send(spans) -> bool` (OtlpHttpExporter) or the
    SDK's `export(spans)`. The SDK's own spans (other libraries' instrumentation under the global
    provider) join the same queue through `span_processor()`.
    """

    def __init__(self, exporter: Any, **batch: Any) -> None:
        self._send = getattr(exporter, "send", None)
        self._queue: collections.deque[Any] = collections.deque()
        self._export_lock = threading.Lock()
        super().__init__(exporter, **batch)

    def _after_fork(self) -> None:
        self._queue.clear()
        self._export_lock = threading.Lock()
        super()._after_fork()

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


def span_processor(batcher: Any) -> Any:
    """An SDK SpanProcessor that puts the SDK's sampled spans in `batcher`'s queue."""
    from opentelemetry.sdk.trace import SpanProcessor

    class _Processor(SpanProcessor):
        def on_end(self, span: Any) -> None:
            if span.context.trace_flags.sampled:
                batcher.add(span)

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return batcher.force_flush(timeout_millis)

        def shutdown(self) -> None:
            batcher.shutdown()

    return _Processor()


# -- OTLP/HTTP --------------------------------------------------------------------------------

DEFAULT_ENDPOINT = "http://localhost:4318"
_RETRYABLE = (429, 502, 503, 504)


def _encodes(span: Any) -> bool:
    try:
        encode([span])
    except UnicodeEncodeError:
        return False
    return True


def env(name: str, default: str = "") -> str:
    """`OTEL_EXPORTER_OTLP_TRACES_<name>`, else `OTEL_EXPORTER_OTLP_<name>`."""
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}")
        or default
    )


def traces_endpoint() -> str:
    if e := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return e.strip()
    base = (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT).strip()
    return f"{base.removesuffix('/')}/v1/traces"


def parse_headers(raw: str) -> dict[str, str]:
    """`k1=v1,k2=v2`, URL-encoded values (the OTLP exporter spec); bad pairs are skipped."""
    out = {}
    for pair in raw.split(","):
        k, sep, v = pair.partition("=")
        k = urllib.parse.unquote(k).strip().lower()
        if sep and k:
            out[k] = urllib.parse.unquote(v).strip()
        elif pair.strip():
            log.warning("OTLP headers: ignoring %r", pair)
    return out


class OtlpHttpExporter:
    """POST ExportTraceServiceRequest protobuf to an OTLP/HTTP endpoint (SpanExporter API)."""

    def __init__(
        self,
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        compression: str | None = None,
    ) -> None:
        self.endpoint = endpoint or traces_endpoint()
        url = urllib.parse.urlsplit(self.endpoint)
        self._https = url.scheme == "https"
        self._host = url.hostname or "localhost"
        self._port = url.port or (443 if self._https else 80)
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        if timeout is None:
            try:
                timeout = float(env("TIMEOUT", "10"))
            except ValueError:
                timeout = 10.0
        self.timeout = timeout
        comp = compression if compression is not None else env("COMPRESSION", "none")
        self.gzip = comp.strip().lower() == "gzip"
        self.headers = {
            "content-type": "application/x-protobuf",
            "user-agent": "chainyard-otlp-exporter",
        }
        self.headers.update(parse_headers(env("HEADERS")))
        if headers:
            self.headers.update({k.lower(): v for k, v in headers.items()})
        if self.gzip:
            self.headers["content-encoding"] = "gzip"
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=env("CERTIFICATE") or None)
            cert, key = env("CLIENT_CERTIFICATE"), env("CLIENT_KEY")
            if cert:
                self._ssl.load_cert_chain(cert, key or None)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._shutdown = False
        self.exported = 0  # spans accepted by the endpoint
        self.failed = 0  # spans dropped after the last try

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        else:
            self._conn.timeout = timeout
            if self._conn.sock is not None:
                self._conn.sock.settimeout(timeout)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def post(self, body: bytes) -> bool:
        """Send one request body, retrying 429/502/503/504 and connection errors with backoff
        until the timeout; True when the endpoint took it."""
        if self.gzip:
            body = gzip.compress(body, compresslevel=6)
        deadline = time.monotonic() + self.timeout
        delay = 0.1
        with self._lock:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    conn = self._connection(left)
                    conn.request("POST", self._path, body, self.headers)
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                    if resp.will_close:
                        self._close()
                except (OSError, http.client.HTTPException) as e:
                    self._close()
                    status, err = 0, e
                else:
                    err = None
                if 200 <= status < 300:
                    return True
                if status and status not in _RETRYABLE:
                    log.warning("OTLP export to %s: HTTP %s", self.endpoint, status)
                    return False
                if time.monotonic() + delay >= deadline or self._shutdown:
                    log.warning("OTLP export to %s failed: %s", self.endpoint, err or status)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # SpanExporter API

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS if self.send(spans) else SpanExportResult.FAILURE

    def send(self, spans: Sequence[Any]) -> bool:
        if not spans:
            return True
        try:
            body = encode(spans)
        except UnicodeEncodeError:  # a string that is not valid Unicode: drop that span only
            kept = [s for s in spans if _encodes(s)]
            bad = len(spans) - len(kept)
            self.failed += bad
            log.warning("%d span(s) dropped: strings that are not valid Unicode", bad)
            spans, body = kept, encode(kept)
        ok = self.post(body)
        if ok:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return ok

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        self._shutdown = True
        with self._lock:
            self._close()
