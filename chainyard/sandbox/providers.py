"""A local imitation of the OpenAI, Anthropic and Gemini HTTP APIs, all three on one port.

    async with SandboxServer(SandboxConfig(latency_ms=5)) as s:
        OpenAI: f"{s.url}/v1"   Anthropic: s.url   Gemini: s.url
        await s.configure(rate_limit_next=2)   # live change, e.g. two 429s
        s.counts["openai.chat"], s.captured[-1].body

Used by the adapter tests and, with the defaults (no latency, no capture), by benchmarks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Self

from aiohttp import web

from . import _anthropic, _gemini, _openai
from ._core import Captured, SandboxConfig, State

_Handler = Callable[[State, web.Request], Awaitable[web.StreamResponse]]

ENDPOINTS = ("openai.chat", "anthropic.messages", "gemini.generate", "gemini.stream")


def make_app(state: State) -> web.Application:
    """The aiohttp application serving all three wire formats from one State."""

    def bind(handler: _Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            if state.config.dark and state.config.dark_mode == "refuse" and request.transport:
                # A kept-alive connection that predates the switch: reset it, as a dead host would.
                request.transport.abort()
                raise web.HTTPServiceUnavailable()
            return await handler(state, request)

        return run

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", bind(_openai.handle))
    app.router.add_post("/v1/messages", bind(_anthropic.handle))
    app.router.add_post("/v1beta/models/{target}", bind(_gemini.handle))
    app.router.add_post("/v1/models/{target}", bind(_gemini.handle))
    return app


class SandboxServer:
    """Binds 127.0.0.1 on a free port (or `port`) and serves until the `async with` ends."""

    def __init__(
        self, config: SandboxConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.state = State(config or SandboxConfig())
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def config(self) -> SandboxConfig:
        return self.state.config

    @property
    def url(self) -> str:
        """Base URL without a path; the OpenAI base URL is `url + "/v1"`."""
        return f"http://{self.host}:{self.port}"

    @property
    def counts(self) -> Counter[str]:
        """Requests received per endpoint ("openai.chat", "anthropic.messages", ...)."""
        return self.state.counts

    @property
    def captured(self) -> list[Captured]:
        """The most recent requests (up to `config.capture`), oldest first."""
        return list(self.state.captured)

    def last(self, endpoint: str | None = None) -> Captured:
        for c in reversed(self.state.captured):
            if endpoint is None or c.endpoint == endpoint:
                return c
        raise LookupError(f"no captured request for {endpoint!r}")

    async def wait_requests(self, n: int, endpoint: str, timeout: float = 30.0) -> None:
        """Return once `endpoint` has received at least `n` requests (TimeoutError if not)."""

        async def reached() -> None:
            while self.state.counts[endpoint] < n:
                self.state.arrived = asyncio.Event()
                await self.state.arrived.wait()

        await asyncio.wait_for(reached(), timeout)

    def reset_counts(self) -> None:
        self.state.counts.clear()
        self.state.captured.clear()
        self.state.calls = 0
        self.state.tokens_served = 0

    async def start(self) -> Self:
        # handler_cancellation: a client that gave up (timeout tests) cancels the handler's
        # latency sleep, so shutdown never waits on abandoned requests.
        self._runner = web.AppRunner(
            make_app(self.state), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await self._listen()
        return self

    async def _listen(self) -> None:
        assert self._runner is not None
        if self.config.dark and self.config.dark_mode == "refuse":
            return
        self._site = web.TCPSite(self._runner, self.host, self.port)
        await self._site.start()
        if self.port == 0:
            # Keep the port for the life of the server, so going dark and back keeps the URL.
            self.port = self._runner.addresses[0][1]

    async def configure(self, config: SandboxConfig | None = None, **changes: Any) -> SandboxConfig:
        """Replace the config (or change some fields) live; resets the RNG and 429 windows.

        With dark=True and dark_mode="refuse" the listener closes (connection refused); it
        reopens on the same port when dark is switched off.
        """
        base = config or self.state.config
        new = base.__class__(**{**{f: getattr(base, f) for f in base.__struct_fields__}, **changes})
        refusing = new.dark and new.dark_mode == "refuse"
        if refusing and self._site is not None:
            await self._site.stop()
            self._site = None
        self.state.apply(new)
        if not refusing and self._site is None and self._runner is not None:
            await self._listen()
        return new

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
