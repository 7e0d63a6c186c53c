"""The HTTP client every adapter uses: the one place where the client library is chosen.

Adapters get an `httpx.AsyncClient` (its whole API: post, stream, timeouts, errors), but the
sockets and HTTP/1.1 parsing are aiohttp's, through the `httpx-aiohttp` transport: httpx's own
pool (httpcore) slows down badly with many concurrent requests (encode/httpx#3215); see
bench/http_clients.py for the measured numbers. Without httpx-aiohttp installed, it falls back
to plain httpx with an unbounded pool, and `BACKEND` says which one is in use.

Notes on the aiohttp transport: env proxies (HTTP(S)_PROXY) are not used, there is no HTTP/2,
and the client is bound to the event loop of its first request, as httpx's own is. Errors are
httpx's (ConnectError, ReadTimeout, ...): the few that httpx-aiohttp 0.2 maps wrongly (connection
refused as ConnectTimeout) or not at all are remapped here, for requests; a failure while reading
a streamed body is mapped by httpx-aiohttp alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
import httpx
from yarl import URL

try:
    from httpx_aiohttp import AiohttpTransport
except ImportError:  # pragma: no cover - only without the dependency
    AiohttpTransport = None  # type: ignore[assignment,misc]

BACKEND = "aiohttp" if AiohttpTransport is not None else "httpcore"
KEEPALIVE_S = 30.0  # idle connections kept this long (provider APIs keep theirs ~60 s or more)


if AiohttpTransport is not None:

    class _Transport(AiohttpTransport):  # type: ignore[misc,valid-type]
        """httpx-aiohttp's transport, with an unbounded pool (its own default caps it at 100)."""

        def get_client(self) -> aiohttp.ClientSession:
            if self.client is not None:
                return super().get_client()
            connector = aiohttp.TCPConnector(
                limit=0, ssl=self.ssl_context, keepalive_timeout=KEEPALIVE_S
            )
            # created lazily, on the first request, so inside the running loop
            return aiohttp.ClientSession(connector=connector)

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            try:
                return await super().handle_async_request(request)
            except httpx.ConnectTimeout as e:  # httpx-aiohttp 0.2 maps refused/reset to this
                if e.__cause__ is None or isinstance(e.__cause__, TimeoutError):
                    raise
                raise _as_httpx(e.__cause__, request) from e.__cause__
            except aiohttp.ClientError as e:  # the ones it leaves unmapped
                raise _as_httpx(e, request) from e


def _as_httpx(exc: BaseException, request: httpx.Request | None) -> httpx.TransportError:
    """The httpx error httpx's own transport would raise for this aiohttp failure."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(str(exc), request=request)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return httpx.ReadError(str(exc), request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(str(exc), request=request)
    if isinstance(exc, aiohttp.ClientConnectionError) and not isinstance(
        exc, aiohttp.ServerDisconnectedError
    ):
        return httpx.ReadError(str(exc), request=request)
    return httpx.RemoteProtocolError(str(exc), request=request)


def new_client(
    base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 600.0
) -> httpx.AsyncClient:
    """An httpx-API client for one provider base URL, sized for thousands of concurrent calls."""
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    if AiohttpTransport is None:  # pragma: no cover
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=1024, keepalive_expiry=KEEPALIVE_S
        )
        return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits)
    return httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, transport=_Transport()
    )


class _Fast:
    """What `post_bytes` needs of one client, worked out once: its aiohttp transport, headers,
    timeout and the full URL of each path it has posted to."""

    __slots__ = ("defaults", "headers", "timeout", "transport", "urls")

    def __init__(self, client: httpx.AsyncClient, transport: _Transport) -> None:
        t = client.timeout
        self.transport = transport
        self.headers = dict(client.headers)  # the very headers httpx would send
        # the same mapping as httpx-aiohttp's transport: connect -> socket connect, read -> each
        # socket read, pool -> waiting for a connection
        self.timeout = aiohttp.ClientTimeout(
            sock_connect=t.connect, sock_read=t.read, connect=t.pool
        )
        self.urls: dict[str, URL] = {}
        self.defaults = False  # the session was made here, with these headers and timeout

    def session(self) -> aiohttp.ClientSession:
        """The transport's session, made with this client's headers and timeouts as its defaults
        (a call then passes none: no header merging per call). httpx's own path, which uses the
        same session, still passes both with every request, and those win."""
        tr = self.transport
        if not isinstance(tr.client, aiohttp.ClientSession):
            connector = aiohttp.TCPConnector(
                limit=0, ssl=tr.ssl_context, keepalive_timeout=KEEPALIVE_S
            )
            tr.client = aiohttp.ClientSession(
                connector=connector, headers=self.headers, timeout=self.timeout
            )
            self.defaults = True
        return tr.client

    def url(self, client: httpx.AsyncClient, path: str) -> URL:
        u = self.urls.get(path)
        if u is None:
            if len(self.urls) > 1024:  # paths are per model: a handful; never grow without bound
                self.urls.clear()
            u = self.urls[path] = URL(str(client._merge_url(path)), encoded=True)
        return u


def _fast_of(client: httpx.AsyncClient) -> _Fast | None:
    tr = client._transport
    if AiohttpTransport is None or type(tr) is not _Transport:
        return None
    f: _Fast | None = getattr(tr, "fast", None)
    if f is None:
        f = tr.fast = _Fast(client, tr)  # a transport serves the one client it was made for
    return f


async def post_bytes(
    client: httpx.AsyncClient, path: str, content: bytes
) -> tuple[int, Mapping[str, str], bytes]:
    """POST `content` to `path` on the client's base URL: (status, headers, body).

    The hot path of every non-streaming provider call. httpx's request and response models,
    URL merging and cookie handling cost more CPU per call than the HTTP exchange itself, so a
    client made by `new_client` posts straight through the aiohttp session under its transport
    (same connection pool, headers and timeouts); failures are raised as the httpx errors that
    the httpx path would raise. Any other client goes through `client.post`. The returned
    headers are case-insensitive either way.
    """
    f = _fast_of(client)
    if f is None or client.is_closed:
        r = await client.post(path, content=content)
        return r.status_code, r.headers, r.content
    session = f.session()
    try:
        if f.defaults:
            call = session.post(f.url(client, path), data=content, allow_redirects=False)
        else:
            call = session.post(
                f.url(client, path), data=content, headers=f.headers, timeout=f.timeout,
                allow_redirects=False,
            )  # fmt: skip
        async with call as resp:
            return resp.status, resp.headers, await resp.read()
    except aiohttp.ConnectionTimeoutError as e:
        raise httpx.ConnectTimeout(str(e) or "connect timeout") from e
    except (TimeoutError, aiohttp.ServerTimeoutError) as e:
        raise httpx.ReadTimeout(str(e) or "read timeout") from e
    except aiohttp.ClientError as e:
        raise _as_httpx(e, None) from e
