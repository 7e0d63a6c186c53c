"""The service port (`--metrics-port`): `/metrics`, `/healthz`, `/readyz`, on the service's loop.

Served from before the service reaches NATS, so an orchestrator sees "alive, not ready" rather
than nothing while NATS is down; `/healthz` answers from the service's own loop, so a blocked
loop fails it. docs/KUBERNETES.md ("Probes") describes what each path answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # aiohttp is imported when the port is opened, not by every importer
    from aiohttp import web

log = logging.getLogger("chainyard.probes")
# A check's answer: None when it passes, else why not (one short line, no secrets).
Check = Callable[[], Awaitable[str | None]]
CHECK_TIMEOUT_S = 2.0  # below the probe's own timeout (5 s in the rendered manifests)


class Probes:
    def __init__(self) -> None:
        self.waiting = "starting"  # why not ready while no checks are set (key `startup`)
        self.checks: dict[str, Check] = {}
        self.registry: Any = None  # a prometheus CollectorRegistry, set by runtime.metrics
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, port: int, addr: str = "0.0.0.0") -> int:
        """Listen on `port` (0: any free port); returns the port."""
        from aiohttp import web
        from prometheus_client.aiohttp import make_aiohttp_handler

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(request: web.Request) -> web.Response:
            checks = await self.readiness()
            failing = {k: v for k, v in checks.items() if v != "ok"}
            if not failing:
                return web.json_response({"ready": True, "checks": checks})
            reason = "; ".join(f"{k}: {v}" for k, v in failing.items())
            return web.json_response(
                {"ready": False, "reason": reason, "checks": checks}, status=503
            )

        async def serve_metrics(request: web.Request) -> web.StreamResponse:
            if self.registry is None:
                return web.json_response({"error": "metrics are not set up yet"}, status=503)
            return await make_aiohttp_handler(self.registry)(request)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", serve_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, addr, port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("/metrics, /healthz, /readyz on %s:%s", addr, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def ready_when(self, checks: dict[str, Check]) -> None:
        """From now on, ready is every one of `checks` passing."""
        self.checks = dict(checks)
        self.waiting = ""

    async def readiness(self) -> dict[str, str]:
        """Each check's answer ("ok" or why not), run together, each within CHECK_TIMEOUT_S."""
        if self.waiting:
            return {"startup": self.waiting}

        async def one(check: Check) -> str:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    return await check() or "ok"
            except TimeoutError:
                return f"no answer within {CHECK_TIMEOUT_S:g} s"
            except Exception as e:  # a check that breaks says so; the probe answers anyway
                return f"check failed: {type(e).__name__}: {e}"

        answers = await asyncio.gather(*(one(c) for c in self.checks.values()))
        return dict(zip(self.checks, answers, strict=True))
