"""The HTTP server: aiohttp.web (already a dependency), chosen by a measurement.

On this 2-core machine, a minimal JSON POST handler answered at 1 in flight in 0.22 / 0.62 ms
p50 / p99 with aiohttp.web, 0.22 / 0.38 with Starlette on uvicorn (httptools, uvloop), 0.39 /
1.04 with Starlette on granian; at 32 in flight 2.59 / 4.97 ms, 2.65 / 6.97 and 2.60 / 6.43
(docs/GATEWAY.md). The server is only this module: the fronts take an aiohttp request and
return a response, so another server means rewriting this file and http.py alone.

Every error leaves as the front's own error shape: OpenAI's for `/v1/chat/completions`,
`/v1/responses`, `/v1/models` and `/v1/chains`, Anthropic's for `/v1/messages`; a bug is a 500
in that shape and is logged, and the service goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from aiohttp import web
from nats.errors import Error as NatsError

from chainyard.refusals import PermissionDenied

from . import anthropic, chains, openai, responses
from .core import ApiError, Gateway

log = logging.getLogger("chainyard.gateway")

Handler = Callable[[Gateway, web.Request], Awaitable[web.StreamResponse]]
ErrorShape = Callable[[ApiError], web.Response]


def _misconfigured() -> ApiError:
    return ApiError(
        500,
        "the gateway is misconfigured: its NATS user may not do what this request needs (the "
        "gateway's log names the permission); retrying will not help",
        type="api_error",
        code="gateway_misconfigured",
    )


def _guard(
    gw: Gateway, handler: Handler, shape: ErrorShape
) -> Callable[..., Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(gw, request)
        except ApiError as e:
            return shape(e)
        except web.HTTPRequestEntityTooLarge:
            return shape(ApiError(413, "the request body is too large", code="request_too_large"))
        except PermissionDenied as e:  # the server refused a subject this request needs
            log.error("%s %s: %s", request.method, request.path, e)
            return shape(_misconfigured())
        except ConnectionResetError:  # the client went away mid-answer; nothing to answer
            log.info("%s %s: the client disconnected", request.method, request.path)
            raise
        except asyncio.CancelledError:
            raise
        except (NatsError, TimeoutError) as e:  # NATS unreachable or slow: try again shortly
            if (denied := gw.refusals.recent()) is not None:  # unless the server refused it
                log.error("%s %s: %s (%r)", request.method, request.path, denied, e)
                return shape(_misconfigured())
            log.warning("%s %s: NATS: %r", request.method, request.path, e)
            return shape(
                ApiError(
                    503, "the gateway cannot reach NATS right now; retry shortly",
                    type="api_error", code="unavailable", headers={"retry-after": "1"},
                )
            )  # fmt: skip
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return shape(ApiError(500, "internal error in the gateway", type="api_error"))

    return handle


def application(gw: Gateway) -> web.Application:
    app = web.Application(client_max_size=gw.settings.max_body_bytes + 1)

    def add(
        method: str, path: str, handler: Handler, shape: ErrorShape = openai.error_response
    ) -> None:
        app.router.add_route(method, path, _guard(gw, handler, shape))

    add("POST", "/v1/chat/completions", openai.chat_completions)
    add("POST", "/v1/responses", responses.create)
    add("*", "/v1/responses/{response_id}", responses.stored)
    add("*", "/v1/responses/{response_id}/{rest:.*}", responses.stored)
    add("GET", "/v1/models", openai.list_models)
    add("GET", "/v1/models/{model}", openai.get_model)
    add("POST", "/v1/messages", anthropic.messages, anthropic.error_response)
    add("POST", "/v1/chains", chains.submit)
    add("GET", "/v1/chains/{chain_id}", chains.state)
    add("GET", "/v1/chains/{chain_id}/events", chains.events)
    add("POST", "/v1/chains/{chain_id}/cancel", chains.cancel)
    add("POST", "/v1/chains/{chain_id}/signal/{name}", chains.signal)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if gw.nc.is_connected:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="NATS is not connected\n")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def not_found(request: web.Request) -> web.Response:
        e = ApiError(
            404, f"no such endpoint: {request.method} {request.path}", type="not_found_error"
        )
        return (
            anthropic.error_response(e)
            if request.path.startswith("/v1/messages")
            else openai.error_response(e)
        )

    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


class HttpServer:
    """The gateway's HTTP listener: `async with HttpServer(gw, host, port) as s: s.url`.

    Port 0 takes a free port. A client that disconnects cancels its handler (aiohttp's
    `handler_cancellation`), and the handler cancels the chain it was waiting for."""

    def __init__(self, gw: Gateway, host: str = "127.0.0.1", port: int = 0) -> None:
        self.gw, self.host, self.port = gw, host, port
        self.runner = web.AppRunner(application(gw), handler_cancellation=True, access_log=None)
        self.url = ""

    async def __aenter__(self) -> HttpServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=1024)
        try:
            await site.start()
        except OSError:  # the port is taken: nothing is left behind
            await self.runner.cleanup()
            raise
        sockets = self.runner.addresses
        port = sockets[0][1] if sockets else self.port
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        self.url = f"http://{shown}:{port}"
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.runner.cleanup()
        await self.gw.close()
