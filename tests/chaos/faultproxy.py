"""A provider that fails the ways real ones do: an HTTP front for the sandbox's OpenAI API that
answers a share of calls with a fault, and forwards the rest.

Faults, drawn from a seeded RNG (same seed, same sequence of draws):
- `500`: a JSON error body;
- `503` and `429`: with `retry-after: 1`;
- `reset`: a 200 whose body stops half-way and whose connection is then cut;
- `stall`: nothing for `stall_s` (longer than the pool's timeout), then the connection is cut;
- `bad_json`: a 200 whose body is not JSON;
- `html_502`: a 502 from a "load balancer", an HTML page.
The sandbox's own faults (SandboxConfig) cover statuses; these are the transport-level ones it
does not have.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import aiohttp
from aiohttp import web

KINDS = ("500", "503", "429", "reset", "stall", "bad_json", "html_502")
HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
)


class FaultProxy:
    def __init__(
        self, target: str, *, rate: float = 0.15, seed: int = 15, stall_s: float = 3.0
    ) -> None:
        self.target = target.rstrip("/")
        self.rate = rate
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()  # faults served, by kind, and "ok"
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FaultProxy:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        # handler_cancellation: a client that gave up on a stall ends its handler
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._client = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        kind = self.rng.choice(KINDS) if self.rng.random() < self.rate else "ok"
        self.counts[kind] += 1
        if kind == "ok":
            return await self._forward(request, body)
        if kind in ("500", "503", "429"):
            headers = {} if kind == "500" else {"retry-after": "1"}
            return web.json_response(
                {"error": {"message": f"injected {kind}", "type": "server_error"}},
                status=int(kind),
                headers=headers,
            )
        if kind == "html_502":
            return web.Response(status=502, body=HTML_502, content_type="text/html")
        if kind == "bad_json":
            return web.Response(
                status=200,
                body=b'{"id": "chatcmpl-1", "choices": [{"mess',
                content_type="application/json",
            )
        if kind == "stall":
            await asyncio.sleep(self.stall_s)  # the fault's duration: the client times out first
            self._cut(request)
            return web.Response(status=500)
        # reset: promise a body, send half of it, cut the connection
        resp = web.StreamResponse(status=200, headers={"Content-Length": "400"})
        resp.content_type = "application/json"
        await resp.prepare(request)
        await resp.write(b'{"id": "chatcmpl-1", "object": "chat.completion", "choi')
        self._cut(request)
        return resp

    @staticmethod
    def _cut(request: web.Request) -> None:
        if request.transport is not None:
            request.transport.abort()

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASSED}
        async with self._client.post(self.target + request.path, data=body, headers=headers) as r:
            data = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower().startswith("x-ratelimit")}
            return web.Response(
                status=r.status, body=data, headers=out, content_type=r.content_type
            )


_PASSED = ("authorization", "content-type", "api-key")
