"""The HTTP client of every provider call, streaming or not: the one module that names the library.

It is aiohttp, measured against the other maintained clients at a worker's load. A provider's
client has one bounded pool, the pool's or the environment's proxy, TLS always verified, a cap
on response bytes, and never sends a request twice: aiohttp re-sends only idempotent methods,
so a POST on a kept-alive connection that closes raises `HttpError`, and the router fails over.
docs/DESIGN-NOTES.md #22 has the figures and each guarantee; HTTP/2 is not available.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import aiohttp
import certifi
from yarl import URL

KEEPALIVE_S = 30.0  # idle connections kept this long (provider APIs keep theirs ~60 s or more)
CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # a completion is KBs; this is a fault's size


class HttpError(Exception):
    """The exchange failed below HTTP: no answer, or not all of it. The request may have reached
    the provider; it is never sent again here."""


class HttpTimeout(HttpError):
    """Connecting took longer than the connect timeout, or the answer stalled past the read one."""


class ResponseTooLarge(HttpError):
    """The answer is longer than the client's `max_response_bytes`."""


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    """How a provider's client connects (the pool config's proxy, ca_bundle, ...)."""

    proxy: str | None = None  # "http://user:pass@host:port"; None: the environment's
    ca_bundle: str | None = None  # PEM file of the CAs to trust, instead of the default ones
    max_connections: int = 1024
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES


def ssl_context(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying context: `ca_bundle`, else SSL_CERT_FILE / SSL_CERT_DIR, else certifi's roots
    (what httpx trusted before, so a deployment that worked keeps working)."""
    cafile = ca_bundle or os.environ.get("SSL_CERT_FILE") or None
    capath = None if ca_bundle else os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        cafile = certifi.where()
    return ssl.create_default_context(cafile=cafile, capath=capath)


def env_proxy(url: URL) -> str | None:
    """The proxy the environment names for `url`, unless NO_PROXY exempts its host."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or (url.host and urllib.request.proxy_bypass(url.host)):
        return None
    return proxy


class StreamedResponse:
    """A response whose body is read as it comes: status and headers first. Read inside
    `HttpClient.stream`, whose `_mapped` turns aiohttp's failures into this module's."""

    def __init__(self, resp: aiohttp.ClientResponse, limit: int) -> None:
        self._resp = resp
        self._limit = limit
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers  # case-insensitive

    async def read(self) -> bytes:
        return await _read(self._resp, self._limit)

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines as text (no line ends), the whole body bounded by the size cap."""
        pending = b""
        async for chunk in _chunks(self._resp, self._limit):
            *done, pending = (pending + chunk).split(b"\n")
            for line in done:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if pending:
            yield pending.rstrip(b"\r").decode("utf-8", "replace")


class HttpClient:
    """POSTs to one provider base URL, with its default headers; made outside the event loop
    (the session and its pool are made on the first call, inside the loop)."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
        settings: HttpSettings | None = None,
    ) -> None:
        s = self.settings = settings or HttpSettings()
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self._limit = s.max_response_bytes
        origin = URL(self.base_url)
        if origin.scheme not in ("http", "https") or not origin.host:
            raise ValueError(f"a provider base URL must be http(s)://host...: {base_url!r}")
        proxy = s.proxy or env_proxy(origin)
        proxy_url = URL(proxy) if proxy else None
        # credentials in the proxy URL go in Proxy-Authorization, not on the wire as userinfo
        self._proxy_auth = aiohttp.BasicAuth.from_url(proxy_url) if proxy_url else None
        self._proxy = proxy_url.with_user(None) if proxy_url else None
        self._ssl = ssl_context(s.ca_bundle) if origin.scheme == "https" else None
        # sock_read: the longest silence while an answer is awaited or streamed
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def proxy(self) -> str | None:
        """The proxy this client's calls go through, or None (for logs and tests)."""
        return str(self._proxy) if self._proxy else None

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise HttpError("the HTTP client is closed")
        session = self._session
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=self.settings.max_connections, limit_per_host=0, ssl=self._ssl or True,
                keepalive_timeout=KEEPALIVE_S,
            )  # fmt: skip
            # trust_env off: the proxy is chosen above, and ~/.netrc must not add credentials
            session = self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, timeout=self._timeout,
                proxy=self._proxy, proxy_auth=self._proxy_auth, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )  # fmt: skip
        return session

    async def post(self, path: str, content: bytes) -> tuple[int, Mapping[str, str], bytes]:
        """POST `content` to `path` (after the base URL's path): (status, headers, body)."""
        session = self._open()
        with _mapped():
            async with session.post(self.base_url + path, data=content) as resp:
                return resp.status, resp.headers, await _read(resp, self._limit)

    @contextlib.asynccontextmanager
    async def stream(self, path: str, content: bytes) -> AsyncIterator[StreamedResponse]:
        """POST and hand over the response once its head is in; its body is read by the caller."""
        session = self._open()
        with _mapped():
            async with session.post(self.base_url + path, data=content) as resp:
                yield StreamedResponse(resp, self._limit)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


async def _read(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, refused once it passes `limit` bytes (decoded bytes, when compressed)."""
    length = resp.content_length
    if length is not None and length > limit:
        raise ResponseTooLarge(f"response of {length} bytes, over the {limit} byte limit")
    if length is not None and "content-encoding" not in resp.headers:
        return await resp.read()  # the hot path: a small body of known length
    return b"".join([chunk async for chunk in _chunks(resp, limit)])


async def _chunks(resp: aiohttp.ClientResponse, limit: int) -> AsyncIterator[bytes]:
    """The body as it comes, refused once it passes `limit` bytes."""
    total = 0
    async for chunk in resp.content.iter_any():
        total += len(chunk)
        if total > limit:
            raise ResponseTooLarge(f"response over the {limit} byte limit")
        yield chunk


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """aiohttp's failures as this module's."""
    try:
        yield
    except HttpError:
        raise
    except TimeoutError as e:  # aiohttp's connect and read timeouts are TimeoutErrors
        raise HttpTimeout(f"timed out ({type(e).__name__})") from e
    except aiohttp.ClientError as e:
        raise HttpError(f"{type(e).__name__}: {e}") from e
