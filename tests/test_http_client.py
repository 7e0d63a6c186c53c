"""The HTTP client of every provider call (workers/providers/_http.py).

Raw asyncio servers on free ports answer with exact bytes and count what they were sent, so
framing, keep-alive, the no-second-POST rule, size caps, timeouts and TLS are checked on the
socket. The proxy tests run a real forward proxy process (proxy.py) and read its access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from helpers import wait_until
from sandbox_fixtures import KEY, req, sandbox  # noqa: F401  (fixture)

from chainyard.contracts import PoolConfig
from chainyard.sandbox import SandboxServer
from chainyard.stack import provider_for
from chainyard.workers.providers import OpenAIProvider, ProviderError
from chainyard.workers.providers._http import (
    HttpClient,
    HttpError,
    HttpSettings,
    HttpTimeout,
    ResponseTooLarge,
)


class RawServer:
    """Reads one request head + body at a time; `answer(request, writer)` writes the reply."""

    def __init__(self, answer: Callable[[bytes, asyncio.StreamWriter], object]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while not writer.is_closing():
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                result = self.answer(request, writer)
                if asyncio.iscoroutine(result):
                    await result
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def raw_server(
    answer: Callable[[bytes, asyncio.StreamWriter], object], tls: ssl.SSLContext | None = None
) -> AsyncIterator[RawServer]:
    srv = RawServer(answer)
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=tls)
    srv.port = server.sockets[0].getsockname()[1]
    async with server:
        yield srv
        server.close()


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def client(port: int, scheme: str = "http", timeout_s: float = 5.0, **kw: object) -> HttpClient:
    return HttpClient(
        f"{scheme}://127.0.0.1:{port}/v1",
        {"Authorization": "Bearer k", "Content-Type": "application/json"},
        timeout_s,
        HttpSettings(**kw),  # type: ignore[arg-type]
    )


@pytest.fixture(autouse=True)
def no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their proxies: none from the machine's environment."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)


async def test_request_bytes_and_keepalive() -> None:
    async with raw_server(lambda req, w: w.write(ok())) as srv:
        c = client(srv.port)
        for i in range(3):
            status, headers, body = await c.post("/chat/completions", b'{"n":%d}' % i)
            assert (status, body) == (200, b'{"ok":true}')
            assert headers["Content-Length"] == "11" and headers["CONTENT-LENGTH"] == "11"
        await c.aclose()
    assert srv.connections == 1  # one kept-alive connection served all three
    head, body = srv.requests[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    fields = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
    assert fields[b"host"] == b"127.0.0.1:%d" % srv.port
    assert fields[b"authorization"] == b"Bearer k"
    assert fields[b"content-length"] == b"7" and body == b'{"n":0}'


async def test_chunked_gzip_and_read_to_close_bodies() -> None:
    packed = gzip.compress(b'{"zipped":1}')
    replies = iter(
        [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b'4\r\n{"a"\r\n4\r\n:12}\r\n0\r\n\r\n',
            ok(packed, b"content-encoding: gzip\r\n"),
            b'HTTP/1.1 201 Created\r\nconnection: close\r\n\r\n{"to":"close"}',
        ]
    )

    def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        reply = next(replies)
        w.write(reply)
        if b"connection: close" in reply:
            w.close()

    async with raw_server(answer) as srv:
        c = client(srv.port)
        assert (await c.post("/x", b"{}"))[2] == b'{"a":12}'
        assert (await c.post("/x", b"{}"))[2] == b'{"zipped":1}'
        status, _, body = await c.post("/x", b"{}")
        assert (status, body) == (201, b'{"to":"close"}')
        await c.aclose()


async def test_a_post_is_never_sent_twice_when_a_kept_alive_connection_closes() -> None:
    """The provider read the request (it may have run and billed it) and closed the connection
    without answering: the call fails, for the router to fail over; nothing is sent again."""

    def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        if b'"second"' in req:
            w.close()  # read, then gone: no byte of an answer
        elif b'"third"' in req:
            w.write(b"HTTP/1.1 200 OK\r\n")  # part of an answer, then gone
            w.close()
        else:
            w.write(ok())

    async with raw_server(answer) as srv:
        c = client(srv.port)
        await c.post("/x", b'"first"')
        with pytest.raises(HttpError):
            await c.post("/x", b'"second"')  # on the kept-alive connection of the first
        await c.post("/x", b'"first"')
        with pytest.raises(HttpError):
            await c.post("/x", b'"third"')
        await c.aclose()
    bodies = [r.split(b"\r\n\r\n", 1)[1] for r in srv.requests]
    assert bodies == [b'"first"', b'"second"', b'"first"', b'"third"']  # each POST once


async def test_the_adapter_fails_over_on_a_closed_connection_without_a_second_post() -> None:
    answer_body = b'{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"model":"m-1"}'

    def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        if len(srv.requests) == 2:
            w.close()
        else:
            w.write(ok(answer_body))

    async with raw_server(answer) as srv:
        p = OpenAIProvider(f"http://127.0.0.1:{srv.port}/v1", KEY)
        assert (await p.complete(req())).output.text == "hi"
        with pytest.raises(ProviderError) as e:
            await p.complete(req())
        assert e.value.cls == "retryable" and "connection error" in e.value.message
        await p.aclose()
    assert len(srv.requests) == 2


async def test_failures_are_the_clients_errors() -> None:
    async def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        if b"half" in req:
            w.write(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"cut')
            await w.drain()
            w.close()
        elif b"garbage" in req:
            w.write(b"NOT HTTP AT ALL\r\n\r\n")
        elif b"slow" in req:
            await asyncio.sleep(5)

    async with raw_server(answer) as srv:
        c = client(srv.port, timeout_s=0.3)
        with pytest.raises(HttpError, match=r"Payload|payload|closed|Disconnect"):
            await c.post("/x", b"half")
        with pytest.raises(HttpError):
            await c.post("/x", b"garbage")
        with pytest.raises(HttpTimeout):
            await c.post("/x", b"slow")
        await c.aclose()
    refused = client(srv.port)  # the server is gone: nothing listens on that port now
    with pytest.raises(HttpError, match="Connect"):
        await refused.post("/x", b"{}")
    await refused.aclose()


async def test_response_size_cap() -> None:
    big = b"x" * 5000

    def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        if b"chunked" in req:
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(5):
                w.write(b"3e8\r\n%s\r\n" % big[:1000])
            w.write(b"0\r\n\r\n")
        elif b"zip" in req:  # small on the wire, large once decoded
            w.write(ok(gzip.compress(big), b"content-encoding: gzip\r\n"))
        else:
            w.write(ok(big))

    async with raw_server(answer) as srv:
        c = client(srv.port, max_response_bytes=4096)
        for body in (b"length", b"chunked", b"zip"):
            with pytest.raises(ResponseTooLarge):
                await c.post("/x", body)
        async with c.stream("/x", b"chunked") as resp:
            assert resp.status == 200
            with pytest.raises(ResponseTooLarge):
                async for _ in resp.lines():
                    pass
        await c.aclose()
        roomy = client(srv.port, max_response_bytes=5000)
        assert (await roomy.post("/x", b"length"))[2] == big
        await roomy.aclose()
        # through an adapter: a clear, retryable ProviderError
        p = OpenAIProvider(
            f"http://127.0.0.1:{srv.port}/v1", http=HttpSettings(max_response_bytes=100)
        )
        with pytest.raises(ProviderError, match="too large") as e:
            await p.complete(req())
        assert e.value.cls == "retryable"
        await p.aclose()


async def test_stream_lines_across_chunks() -> None:
    def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b'data: {"a"', b":1}\r\n\r\ndata: [DO", b"NE]\r\n"):
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
        w.write(b"0\r\n\r\n")

    async with raw_server(answer) as srv:
        c = client(srv.port)
        async with c.stream("/x", b"{}") as resp:
            lines = [line async for line in resp.lines()]
        await c.aclose()
    assert lines == ['data: {"a":1}', "", "data: [DONE]"]


async def test_the_pool_is_bounded() -> None:
    gate = asyncio.Event()

    async def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        await gate.wait()
        w.write(ok())

    async with raw_server(answer) as srv:
        c = client(srv.port, max_connections=2)
        calls = [asyncio.create_task(c.post("/x", b"{}")) for _ in range(5)]
        await wait_until(lambda: len(srv.requests) == 2, 5, "two calls at the server")
        gate.set()
        assert [r[0] for r in await asyncio.gather(*calls)] == [200] * 5
        await c.aclose()
    assert srv.connections == 2  # the other three waited for a connection of the two


# ---------------------------------------------------------------- TLS


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """(key, certificate) for 127.0.0.1, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def tls_server_ctx(key: Path, cert: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_tls_custom_ca_bundle_and_ssl_cert_file(
    self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, cert = self_signed
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with raw_server(lambda req, w: w.write(ok()), tls=tls_server_ctx(key, cert)) as srv:
        trusting = client(srv.port, scheme="https", ca_bundle=str(cert))
        assert (await trusting.post("/x", b"{}"))[0] == 200
        await trusting.aclose()
        default = client(srv.port, scheme="https")  # certifi's roots: the cert is unknown
        with pytest.raises(HttpError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await default.post("/x", b"{}")
        await default.aclose()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        from_env = client(srv.port, scheme="https")
        assert (await from_env.post("/x", b"{}"))[0] == 200
        await from_env.aclose()
    assert len(srv.requests) == 2  # the refused handshake sent nothing


# ---------------------------------------------------------------- a real forward proxy


class Proxy:
    def __init__(self, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def saw(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    """proxy.py on a free port, in its own process group (it forks an acceptor)."""
    port_file, log = tmp_path / "proxy.port", tmp_path / "proxy.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--num-acceptors", "1", "--log-file", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "proxy.py did not start"
            time.sleep(0.02)
        yield Proxy(int(port_file.read_text().split()[0]), log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_env_proxy_sees_the_provider_call_and_no_proxy_exempts(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    async with raw_server(lambda req, w: w.write(ok())) as srv:
        c = client(srv.port)
        assert c.proxy == proxy.url
        assert (await c.post("/chat/completions", b"{}"))[0] == 200
        await c.aclose()  # proxy.py logs a request when its connection closes
        await wait_until(
            lambda: proxy.saw(f"POST 127.0.0.1:{srv.port}/v1/chat/completions"), 10, "proxy log"
        )
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        exempt = client(srv.port)
        assert exempt.proxy is None
        assert (await exempt.post("/exempt", b"{}"))[0] == 200
        await exempt.aclose()
    assert not proxy.saw("/v1/exempt")
    assert len(srv.requests) == 2


async def test_pool_config_proxy_sees_the_provider_call(
    proxy: Proxy,
    sandbox: SandboxServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SANDBOX_KEY", KEY)
    pool = PoolConfig(
        name="p", provider="openai", base_url=f"{sandbox.url}/v1", api_key_env="SANDBOX_KEY",
        proxy=proxy.url,
    )  # fmt: skip
    p = provider_for(pool)
    answer = await p.complete(req())
    assert answer.output.text and answer.limits is not None  # rate-limit headers still read
    await p.aclose()  # proxy.py logs a request when its connection closes
    port = sandbox.url.rsplit(":", 1)[1]
    await wait_until(lambda: proxy.saw(f"POST 127.0.0.1:{port}/v1/chat/completions"), 10, "log")


async def test_https_through_the_proxy_with_a_custom_ca(
    proxy: Proxy, self_signed: tuple[Path, Path]
) -> None:
    key, cert = self_signed
    async with raw_server(lambda req, w: w.write(ok()), tls=tls_server_ctx(key, cert)) as srv:
        c = client(srv.port, scheme="https", proxy=proxy.url, ca_bundle=str(cert))
        assert (await c.post("/x", b"{}"))[0] == 200
        await c.aclose()
    await wait_until(lambda: proxy.saw(f"CONNECT 127.0.0.1:{srv.port}"), 10, "CONNECT logged")
    assert len(srv.requests) == 1


def test_pool_config_http_fields() -> None:
    pool = PoolConfig(name="p", base_url="https://api.example.com/v1", slots=7,
                      proxy="http://u:pw@proxy.internal:3128", max_response_mb=1.5)  # fmt: skip
    p = provider_for(pool)
    c = p._client  # type: ignore[attr-defined]
    assert c.proxy == "http://proxy.internal:3128"  # the credentials go in a header, not the URL
    assert c.settings.max_connections == 7
    assert c.settings.max_response_bytes == 1536 * 1024
    with pytest.raises(ValueError, match="base URL"):
        HttpClient("api.example.com/v1")
