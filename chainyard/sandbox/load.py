"""A load sandbox: OpenAI's non-streaming chat completion, as cheaply as Python can serve it.

The full sandbox (providers.py) plays every behaviour of three APIs and costs ~230 us of CPU a
request under aiohttp: it tops out near 4,300 requests/s on one core, below what a worker must
show (10,000 calls/s at 1 s each). This one answers POST /v1/chat/completions only, with a fixed
assistant message in the real response shape (a fresh id, the request's model, usage and the
OpenAI rate-limit headers), after `latency_ms`: an asyncio Protocol per connection and httptools
(llhttp) for the request, ~20 us a request. Anything else gets OpenAI's error shape (404 for
another path, 400 for a body without a model). It is for benchmarks, not for behaviour tests.

    python -m chainyard.sandbox.load [--latency-ms 1000]  # prints its port, serves till stdin ends
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time

import httptools
import msgspec

TEXT = "Hello! This is the load sandbox answering."
_PATH = b"/v1/chat/completions"


class _Model(msgspec.Struct):
    model: str = ""  # the rest of the request is skipped by the decoder, unread


_decode = msgspec.json.Decoder(_Model).decode


def completion(model: str, n: int, now: int) -> bytes:
    """The response body: OpenAI's CreateChatCompletionResponse with a fixed message."""
    return msgspec.json.encode(
        {
            "id": f"chatcmpl-load{n:012d}",
            "object": "chat.completion",
            "created": now,
            "model": model,
            "system_fingerprint": "fp_sandbox",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": TEXT, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
        }
    )


# completion() as a bytes template: id number, created, model (JSON-encoded), filled per request
_TEMPLATE = (
    completion("\x00", 0, 0)
    .replace(b'"chatcmpl-load000000000000"', b'"chatcmpl-load%012d"')
    .replace(b'"created":0', b'"created":%d')
    .replace(b'"\\u0000"', b"%s")
)


def _response(status: bytes, body: bytes, remaining: int) -> bytes:
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-ratelimit-limit-requests: 1000000000\r\nx-ratelimit-remaining-requests: %d\r\n"
        b"x-ratelimit-reset-requests: 1ms\r\n\r\n%s" % (status, len(body), remaining, body)
    )


def _error(message: str, typ: str) -> bytes:
    err = {"message": message, "type": typ, "param": None, "code": None}
    return msgspec.json.encode({"error": err})


class _Conn(asyncio.Protocol):
    """One client connection; requests are answered in order (HTTP/1.1 pipelining included)."""

    def __init__(self, server: LoadSandbox) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.ready: dict[int, bytes] = {}
        self.seq = self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                body = _error("malformed HTTP request", "invalid_request_error")
                self.transport.write(_response(b"400 Bad Request", body, 0))
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body, self.url, self.body = self.url, b"".join(self.body), b"", []
        seq, self.seq = self.seq, self.seq + 1
        s = self.server
        s.served += 1
        if url.split(b"?", 1)[0] != _PATH:
            err = _error("Unknown path.", "invalid_request_error")
            answer = _response(b"404 Not Found", err, 0)
        else:
            try:
                model = _decode(body).model
            except msgspec.DecodeError:
                model = ""
            if not model:
                err = _error("'model' is required.", "invalid_request_error")
                answer = _response(b"400 Bad Request", err, 0)
            else:
                body = _TEMPLATE % (next(s.ids), int(time.time()), msgspec.json.encode(model))
                answer = _response(b"200 OK", body, max(0, 1_000_000_000 - s.served))
        if s.latency_s > 0:
            asyncio.get_running_loop().call_later(s.latency_s, self._deliver, seq, answer)
        else:
            self._deliver(seq, answer)

    def _deliver(self, seq: int, answer: bytes) -> None:
        self.ready[seq] = answer
        while self.sent in self.ready and self.transport is not None:
            self.transport.write(self.ready.pop(self.sent))
            self.sent += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class LoadSandbox:
    """`async with LoadSandbox(latency_ms) as s:` serves on `s.url` (base URL with /v1)."""

    def __init__(self, latency_ms: float = 0.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.latency_s = latency_ms / 1000
        self.host, self.port = host, port
        self.served = 0
        self.ids = itertools.count(1)  # completion ids, unique per sandbox
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self) -> LoadSandbox:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), self.host, self.port, backlog=4096
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


async def _serve(latency_ms: float) -> None:
    async with LoadSandbox(latency_ms) as s:
        print(s.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m chainyard.sandbox.load", description=__doc__)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(_serve(args.latency_ms))
    else:
        uvloop.run(_serve(args.latency_ms))


if __name__ == "__main__":
    main()
