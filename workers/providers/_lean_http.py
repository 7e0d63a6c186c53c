"""A lean HTTP/1.1 client for the one hot call: POST a small JSON body, read the whole answer.

aiohttp spends ~260 us of CPU on such a request here, httpx more; this pool spends ~20 (bench
`http_clients`, docs/DESIGN-NOTES.md #17). It is an asyncio Protocol per keep-alive connection
and httptools (llhttp, the parser under uvicorn) for the response: no request or response
objects, the request head built once per path, one timer per request.

What it does: keep-alive with an idle expiry, Content-Length, chunked and read-to-close bodies,
gzip-encoded bodies, TLS (the transport's SSL context), case-insensitive response headers.
What it does not: proxies, HTTP/2, redirects, cookies, `Expect: 100-continue` (an interim 1xx
answer is skipped): none of which a provider API needs for a completion. Failures are the httpx
exceptions the httpx path raises for the same fault, so the error taxonomy (_errors.py) is the
same whichever path a call took.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping

import httptools
import httpx
from multidict import CIMultiDict, CIMultiDictProxy

Response = tuple[int, Mapping[str, str], bytes]


class _Disconnected(httpx.RemoteProtocolError):
    """The server closed the connection before the response was complete."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    __slots__ = (
        "body", "closed", "fut", "head_done", "headers", "heard", "idle_since", "parser",
        "transport",
    )  # fmt: skip

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.fut: asyncio.Future[Response] | None = None
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.closed = False
        self.idle_since = 0.0
        self.head_done = False  # the current response's headers are all in
        self.heard = False  # any byte of the current response came

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.heard = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP response: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        fut = self.fut
        if fut is None or fut.done():
            return
        if self.head_done and not self._framed():  # a body that ends when the connection does
            self.on_message_complete()
        else:
            self._fail(_Disconnected("server disconnected without a full response"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.headers = []
        self.body = []
        self.head_done = False

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        fut, self.fut = self.fut, None
        if fut is None or fut.done():
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim 1xx: the real answer follows on the same connection
            self.fut = fut
            return
        headers = CIMultiDictProxy(CIMultiDict(self.headers))
        body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        if headers.get("content-encoding", "").lower() == "gzip":
            try:
                body = zlib.decompress(body, wbits=31)
            except zlib.error as e:
                fut.set_exception(httpx.DecodingError(f"bad gzip body: {e}"))
                self.close()
                return
        if not self.parser.should_keep_alive():
            self.close()
        fut.set_result((status, headers, body))

    # helpers
    def _framed(self) -> bool:
        """Does the response say where its body ends (so a close before that is a failure)?"""
        for name, value in self.headers:
            n = name.lower()
            if n == "content-length" or (n == "transfer-encoding" and "chunked" in value.lower()):
                return True
        return False

    def _fail(self, exc: Exception) -> None:
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def timed_out(self) -> None:
        self._fail(httpx.ReadTimeout("no full response within the read timeout"))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class LeanPool:
    """Keep-alive connections to one origin, unbounded (a provider call is mostly waiting)."""

    def __init__(
        self,
        url: httpx.URL,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float | None,
        read_timeout_s: float | None,
        keepalive_s: float,
        ssl_context: ssl.SSLContext | None,
        target_of: Callable[[str], str] | None = None,
    ) -> None:
        """`target_of(path)`: the request target (path and query) a caller's path goes to; by
        default the path itself. Worked out once per path."""
        self.host = url.host
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        default_port = self.port == (443 if self.tls else 80)
        authority = host if default_port else f"{host}:{self.port}"
        sent = {k.lower(): v for k, v in headers.items() if k.lower() not in _OWN}
        for k, v in sent.items():  # a line break in a header would split the request
            if any(c in k or c in v for c in "\r\n\0"):
                raise ValueError(f"the {k!r} header holds a line break or NUL")
        sent["accept-encoding"] = "gzip"  # the one encoding decoded here
        lines = [f"host: {authority}"] + [f"{k}: {v}" for k, v in sent.items()]
        self._common = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
        self._heads: dict[str, bytes] = {}  # path -> request line and headers, up to the length
        self._target_of = target_of or (lambda path: path)
        self._idle: deque[_Conn] = deque()  # most recently used on the right
        self.connect_timeout = connect_timeout_s
        self.read_timeout = read_timeout_s
        self.keepalive = keepalive_s
        self.closed = False

    def _head(self, path: str) -> bytes:
        head = self._heads.get(path)
        if head is None:
            if len(self._heads) > 1024:  # paths are per model: a handful; never grow unbounded
                self._heads.clear()
            target = self._target_of(path).encode("ascii")
            head = self._heads[path] = b"POST %s HTTP/1.1\r\n%s" % (target, self._common)
        return head

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Conn, self.host, self.port, ssl=self.ssl,
                    server_hostname=self.host if self.tls else None,
                )  # fmt: skip
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except (OSError, ssl.SSLError) as e:
            raise httpx.ConnectError(f"connect to {self.host}:{self.port}: {e}") from None
        return conn

    def _checkout(self) -> _Conn | None:
        """The most recently used live idle connection (LIFO keeps few sockets warm)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and time.monotonic() - conn.idle_since < self.keepalive:
                return conn
            conn.close()
        return None

    async def post(self, path: str, content: bytes) -> Response:
        """POST `content` to `path`: (status, headers, body)."""
        if self.closed:
            raise RuntimeError("the HTTP client is closed")
        conn = self._checkout()
        if conn is not None:
            try:
                return await self._exchange(conn, path, content)
            except _Disconnected:
                # A kept-alive connection the server closed as we wrote (idle timeout): it sent
                # no byte of an answer, so the request was almost surely never read. Once
                # more on a new connection, as browsers and Go's client do.
                if conn.heard:
                    raise
        return await self._exchange(await self._connect(), path, content)

    async def _exchange(self, conn: _Conn, path: str, content: bytes) -> Response:
        loop = asyncio.get_running_loop()
        conn.heard = False
        conn.fut = fut = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(b"%s%d\r\n\r\n%s" % (self._head(path), len(content), content))
        timer = None if self.read_timeout is None else loop.call_later(
            self.read_timeout, conn.timed_out
        )  # fmt: skip
        try:
            result = await fut
        except BaseException:
            conn.close()  # cancelled or failed mid-exchange: the connection's state is unknown
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not conn.closed and not self.closed:
            now = conn.idle_since = time.monotonic()
            idle = self._idle
            idle.append(conn)
            # close what has idled too long from the other end: after a burst, the connections
            # it opened would otherwise stay open until the server drops them
            while idle and (idle[0].closed or now - idle[0].idle_since >= self.keepalive):
                idle.popleft().close()
        return result

    def close(self) -> None:
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


# headers this client writes itself, whatever the caller's defaults say
_OWN = frozenset({"host", "content-length", "transfer-encoding", "connection", "accept-encoding"})
