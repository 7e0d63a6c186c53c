"""The HTTP client every adapter uses: the one place where the client library is chosen.

Adapters get an `httpx.AsyncClient` (its whole API: post, stream, timeouts, errors), but the
sockets and HTTP/1.1 parsing are aiohttp's, through the `httpx-aiohttp` transport: httpx's own
pool (httpcore) slows down badly with many concurrent requests (encode/httpx#3215). The hot
call, a non-streaming POST (`post_bytes`), skips both libraries' request and response models
for a lean pool (_lean_http.py) beside that transport. bench/http_clients.py has the measured
numbers. Without httpx-aiohttp installed, it falls back to plain httpx with an unbounded pool,
and `BACKEND` says which one is in use.

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

from ._lean_http import LeanPool

try:
    from httpx_aiohttp import AiohttpTransport
except ImportError:  # pragma: no cover - only without the dependency
    AiohttpTransport = None  # type: ignore[assignment,misc]

BACKEND = "aiohttp" if AiohttpTransport is not None else "httpcore"
KEEPALIVE_S = 30.0  # idle connections kept this long (provider APIs keep theirs ~60 s or more)


if AiohttpTransport is not None:

    class _Transport(AiohttpTransport):  # type: ignore[misc,valid-type]
        """httpx-aiohttp's transport, with an unbounded pool (its own default caps it at 100),
        and beside it the lean pool that `post_bytes` uses (closed with it)."""

        lean: LeanPool | None = None

        async def aclose(self) -> None:
            if self.lean is not None:
                self.lean.close()
            await super().aclose()

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


def _lean_of(client: httpx.AsyncClient) -> LeanPool | None:
    """The lean pool beside a `new_client` client's transport, made on first use."""
    tr = client._transport
    if AiohttpTransport is None or type(tr) is not _Transport:
        return None
    if tr.lean is None:
        t = client.timeout
        tr.lean = LeanPool(
            client.base_url, client.headers, connect_timeout_s=t.connect,
            read_timeout_s=t.read, keepalive_s=KEEPALIVE_S, ssl_context=tr.ssl_context,
            target_of=lambda path: client._merge_url(path).raw_path.decode("ascii"),
        )  # fmt: skip
    return tr.lean


async def post_bytes(
    client: httpx.AsyncClient, path: str, content: bytes
) -> tuple[int, Mapping[str, str], bytes]:
    """POST `content` to `path` on the client's base URL: (status, headers, body).

    The hot path of every non-streaming provider call. httpx's request and response models,
    and aiohttp's, cost ten times more CPU per call than the HTTP exchange itself, so a client
    made by `new_client` posts through the lean pool beside its transport (_lean_http.py: same
    base URL, headers, timeouts and SSL context, its own keep-alive connections); failures are
    raised as the httpx errors that the httpx path would raise. Any other client goes through
    `client.post`. The returned headers are case-insensitive either way.
    """
    lean = _lean_of(client)
    if lean is None or client.is_closed:
        r = await client.post(path, content=content)
        return r.status_code, r.headers, r.content
    return await lean.post(path, content)
