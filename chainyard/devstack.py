"""The whole system in one process for a laptop: embedded NATS, stand-in providers, services.

A pool whose `base_url` is `"sandbox"` is pointed at the built-in wire-format sandbox, and one
whose `base_url` is `"local-model"` at llama.cpp's server running SmolLM2-135M locally.
"""

from __future__ import annotations

import contextlib
import socket
from types import TracebackType

import msgspec

from chainyard.contracts import Config
from chainyard.runtime.metrics import Observability, start_service
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.sandbox.local_model import LocalModel
from chainyard.stack import Services, build
from chainyard.workers.tools import Tools

SANDBOX = "sandbox"
LOCAL_MODEL = "local-model"
DEFAULT_PORT = 4222  # NATS's own default: what every client and example reaches without a flag


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now (as nats-server binds: with SO_REUSEADDR,
    so a port held only by closed connections counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class DevStack:
    def __init__(
        self,
        config: Config,
        *,
        nats_url: str | None = None,
        local_model: bool = True,
        tools: Tools | None = None,
        sandbox: SandboxConfig | None = None,
        port: int | None = None,
        gateway_port: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        """`port`: where the embedded NATS listens when it is free; None or 0: any free port
        (`port_taken` then says the wanted one was not free). `gateway_port`: start the HTTP
        gateway (open: no keys, tenant `default`) there when it is free, else on any free port
        (0: any); None: no gateway. Its base URL is then `gateway_url`. `metrics_port`: serve
        /metrics, /healthz and /readyz there (`observability.probes`)."""
        self.config = config
        self.nats_url = nats_url or ""
        self.port = port or 0
        self.port_taken = False
        self.gateway_port = gateway_port
        self.gateway_url = ""
        self.metrics_port = metrics_port
        self.observability: Observability | None = None
        self.want_local = local_model and any(p.base_url == LOCAL_MODEL for p in config.pools)
        self.tools = tools
        self.sandbox_config = sandbox or SandboxConfig(latency_ms=150.0)
        self.sandbox: SandboxServer | None = None
        self.local: LocalModel | None = None
        self.bus: Bus | None = None
        self.services: Services | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> DevStack:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        if not self.nats_url:
            port = self.port
            if port and not port_free(port):
                self.port_taken, port = True, -1  # in use: any free port, and say so
            server = await self._stack.enter_async_context(NatsServer(port=port or -1))
            self.nats_url = server.url
        self.sandbox = await self._stack.enter_async_context(SandboxServer(self.sandbox_config))
        if self.want_local:
            self.local = await self._stack.enter_async_context(LocalModel())
        self.config = self._resolve(self.config)
        self.bus = await open_bus(
            self.nats_url, name="chainyard-dev", topology=self.config.topology
        )
        self._stack.push_async_callback(self.bus.close)
        self.services = build(self.bus, self.config, tools=self.tools)
        # traced and measured from the same OTEL_* variables as `chainyard router` / `worker`
        obs = await start_service(
            "dev", self.bus, self.config, self.services.runners, self.metrics_port
        )
        self._stack.push_async_callback(obs.stop)
        self.observability = obs
        self.services.start()
        self._stack.push_async_callback(self.services.shutdown)
        if self.gateway_port is not None:
            await self._start_gateway(self.bus, self.gateway_port)

    async def _start_gateway(self, bus: Bus, port: int) -> None:
        from chainyard.gateway.app import HttpServer
        from chainyard.gateway.core import Gateway

        gateway = Gateway(bus.nc, self.config)
        try:
            server = await self._stack.enter_async_context(HttpServer(gateway, port=port))
        except OSError:  # taken (by another stack, or between a check and the bind): any port
            server = await self._stack.enter_async_context(HttpServer(gateway, port=0))
        self.gateway_url = server.url

    def _resolve(self, config: Config) -> Config:
        pools = []
        for p in config.pools:
            if p.base_url == SANDBOX and self.sandbox:
                p = msgspec.structs.replace(p, base_url=self.sandbox.url + "/v1")
            elif p.base_url == LOCAL_MODEL:
                if self.local is None:
                    continue  # no local model: its pool has no workers, routing goes elsewhere
                p = msgspec.structs.replace(p, base_url=self.local.base_url)
            pools.append(p)
        return msgspec.structs.replace(config, pools=pools)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()
