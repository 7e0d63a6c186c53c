"""The lean HTTP/1.1 pool under the hot provider call (workers/providers/_lean_http.py).

Each test runs a raw asyncio server on a free port that answers with exact bytes, so framing,
keep-alive, failures and timeouts are checked against what goes over the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from helpers import wait_until

from chainyard.workers.providers._http import new_client, post_bytes
from chainyard.workers.providers._lean_http import LeanPool


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


def pool(port: int, read_timeout_s: float | None = 5.0, scheme: str = "http") -> LeanPool:
    return LeanPool(
        httpx.URL(f"{scheme}://127.0.0.1:{port}/v1"),
        {"Authorization": "Bearer k", "Content-Type": "application/json", "Host": "wrong"},
        connect_timeout_s=2.0, read_timeout_s=read_timeout_s, keepalive_s=30.0,
        ssl_context=None,
    )  # fmt: skip


async def test_request_bytes_and_keepalive() -> None:
    async with raw_server(lambda req, w: w.write(ok())) as srv:
        p = pool(srv.port)
        for i in range(3):
            status, headers, body = await p.post("/v1/chat/completions", b'{"n":%d}' % i)
            assert (status, body) == (200, b'{"ok":true}')
            assert headers["Content-Length"] == "11"  # any case
        p.close()
    assert srv.connections == 1  # one kept-alive connection served all three
    head, body = srv.requests[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    fields = dict(line.split(b": ", 1) for line in lines[1:])
    assert fields[b"host"] == b"127.0.0.1:%d" % srv.port  # ours, not the caller's "Host"
    assert fields[b"authorization"] == b"Bearer k"
    assert fields[b"content-length"] == b"7" and body == b'{"n":0}'
    assert fields[b"accept-encoding"] == b"gzip"
    assert len(lines) - 1 == len(fields)  # no header twice


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
        p = pool(srv.port)
        assert (await p.post("/v1/x", b"{}"))[2] == b'{"a":12}'
        assert (await p.post("/v1/x", b"{}"))[2] == b'{"zipped":1}'
        status, _, body = await p.post("/v1/x", b"{}")
        assert (status, body) == (201, b'{"to":"close"}')
        assert not p._idle  # a closing connection is not kept
        p.close()


async def test_stale_keepalive_connection_is_retried_once() -> None:
    def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        if b'"second"' in req and srv.connections == 1:
            w.close()  # the kept-alive connection dies as the next request arrives: no answer
        else:
            w.write(ok())

    async with raw_server(answer) as srv:
        p = pool(srv.port)
        await p.post("/v1/x", b'"first"')
        status, _, _ = await p.post("/v1/x", b'"second"')
        assert status == 200
        assert srv.connections == 2 and len(srv.requests) == 3  # the second one went twice
        p.close()


async def test_a_disconnect_after_part_of_an_answer_is_not_retried() -> None:
    def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        if b'"second"' in req:
            w.write(b"HTTP/1.1 200 OK\r\n")  # part of an answer: the server did see it
            w.close()
        else:
            w.write(ok())

    async with raw_server(answer) as srv:
        p = pool(srv.port)
        await p.post("/v1/x", b'"first"')
        with pytest.raises(httpx.RemoteProtocolError):
            await p.post("/v1/x", b'"second"')
        assert len(srv.requests) == 2
        p.close()


async def test_failures_are_httpx_errors() -> None:
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
        p = pool(srv.port, read_timeout_s=0.3)
        with pytest.raises(httpx.RemoteProtocolError, match="disconnected"):
            await p.post("/v1/x", b"half")
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await p.post("/v1/x", b"garbage")
        with pytest.raises(httpx.ReadTimeout):
            await p.post("/v1/x", b"slow")
        assert not p._idle  # none of those connections is reused
        p.close()
    refused = pool(srv.port)  # the server is gone: nothing listens on that port now
    with pytest.raises(httpx.ConnectError):
        await refused.post("/v1/x", b"{}")


async def test_cancelled_call_drops_its_connection() -> None:
    hold = asyncio.Event()

    async def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        hold.set()
        await asyncio.sleep(5)

    async with raw_server(answer) as srv:
        p = pool(srv.port)
        call = asyncio.create_task(p.post("/v1/x", b"{}"))
        await asyncio.wait_for(hold.wait(), 5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not p._idle
        p.close()


async def test_new_client_posts_through_the_lean_pool_and_closes_it() -> None:
    async with raw_server(lambda req, w: w.write(ok())) as srv:
        client = new_client(f"http://127.0.0.1:{srv.port}/v1", {"x-api-key": "k"})
        status, headers, body = await post_bytes(client, "/chat/completions", b"{}")
        assert status == 200 and body == b'{"ok":true}' and headers["CONTENT-LENGTH"] == "11"
        lean = client._transport.lean  # type: ignore[attr-defined]
        assert lean is not None and len(lean._idle) == 1
        assert srv.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"x-api-key: k\r\n" in srv.requests[0]
        await client.aclose()
        assert lean.closed and not lean._idle


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


async def test_tls(self_signed: tuple[Path, Path]) -> None:
    key, cert = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    async with raw_server(lambda req, w: w.write(ok()), tls=server_ctx) as srv:
        trusting = ssl.create_default_context(cafile=str(cert))
        p = pool(srv.port, scheme="https")
        p.ssl = trusting
        assert (await p.post("/v1/x", b"{}"))[0] == 200
        p.close()
        untrusting = pool(srv.port, scheme="https")  # the system's roots: the cert is unknown
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusting.post("/v1/x", b"{}")


async def test_connections_idle_past_keepalive_are_closed() -> None:
    gate = asyncio.Event()

    async def answer(req: bytes, w: asyncio.StreamWriter) -> None:
        if b"burst" in req:
            await gate.wait()  # hold the burst's calls so that each opens its own connection
        w.write(ok())

    async with raw_server(answer) as srv:
        p = pool(srv.port)
        p.keepalive = 0.2
        burst = [asyncio.create_task(p.post("/v1/x", b"burst")) for _ in range(5)]
        await wait_until(lambda: srv.connections == 5, 5, "five connections")
        gate.set()
        await asyncio.gather(*burst)
        assert len(p._idle) == 5
        old = list(p._idle)  # the newest, reused from now on, is the last
        while time.monotonic() - old[0].idle_since <= 0.25:
            await p.post("/v1/x", b"steady")  # one call at a time: the newest serves them all
        assert [c.closed for c in old] == [True, True, True, True, False]
        assert list(p._idle) == [old[-1]] and srv.connections == 5
        p.close()


def test_header_values_cannot_split_the_request() -> None:
    for bad in ("k\r\nX-Injected: 1", "k\n", "k\0"):
        with pytest.raises(ValueError, match="line break"):
            LeanPool(
                httpx.URL("http://127.0.0.1:1/v1"), {"Authorization": bad},
                connect_timeout_s=1, read_timeout_s=1, keepalive_s=1, ssl_context=None,
            )  # fmt: skip
    v6 = LeanPool(
        httpx.URL("http://[::1]:8080/v1"), {}, connect_timeout_s=1, read_timeout_s=1,
        keepalive_s=1, ssl_context=None,
    )  # fmt: skip
    assert v6._head("/v1/x").startswith(b"POST /v1/x HTTP/1.1\r\nhost: [::1]:8080\r\n")
