"""Assembling services from a config: the router, a worker per pool, tool workers.

This sits on top (with the CLI): the only code that imports both router and workers.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chainyard.contracts import Config, PoolConfig, Target, Usage
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus
from chainyard.workers.llm import llm_executor
from chainyard.workers.pricing import Pricer
from chainyard.workers.providers import HttpSettings, Provider, make_provider
from chainyard.workers.providers.null import NullProvider
from chainyard.workers.runtime import Worker
from chainyard.workers.tools import Tool, Tools, tool_executor

log = logging.getLogger("chainyard.stack")


def load_tools(spec: str) -> Tools:
    """`package.module:attribute` naming a Tools registry."""
    module, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module), attr or "tools")
    if not isinstance(obj, Tools):
        raise TypeError(f"{spec} is a {type(obj).__name__}, not a chainyard Tools registry")
    return obj


def provider_for(pool: PoolConfig) -> Provider:
    if pool.provider == "null":
        return NullProvider()
    key = os.environ.get(pool.api_key_env) if pool.api_key_env else None
    if pool.api_key_env and key is None:
        log.warning("pool %s: environment variable %s is not set", pool.name, pool.api_key_env)
    http = HttpSettings(
        proxy=pool.proxy, ca_bundle=pool.ca_bundle, max_connections=pool.slots,
        max_response_bytes=int(pool.max_response_mb * 1024 * 1024),
    )  # fmt: skip
    return make_provider(pool.provider, pool.base_url, key, timeout_s=pool.timeout_s, http=http)


def price_function(config: Config, pricer: Pricer | None = None):
    """USD for a call: the deployment's configured price wins, else the genai-prices table."""
    pricer = pricer or Pricer()
    overrides = {d.name: d.price for d in config.deployments if d.price is not None}

    def price(target: Target, usage: Usage) -> float:
        return pricer.cost(target.provider, target.model, usage, overrides.get(target.deployment))

    return price


def llm_worker(
    bus: Bus, config: Config, pool: PoolConfig, provider: Provider | None = None, **kw: Any
) -> Worker:
    """A worker for an LLM pool, which closes its provider when it stops; `kw` goes to Worker
    (heartbeat_s, worker_id, ...)."""
    models = sorted({d.model for d in config.deployments if d.pool == pool.name})
    provider = provider or provider_for(pool)
    execute = llm_executor(provider, price_function(config))
    return Worker(
        bus, pool.name, execute, slots=pool.slots, models=models, close=provider.aclose, **kw
    )


def tool_workers(
    bus: Bus, tools: Iterable[Tool], slots: int = 64, config: Config | None = None
) -> list[Worker]:
    """A worker per tool; each call bounded by its pool's `timeout_s` (config `tool_pools`)."""
    config = config or Config()
    return [
        Worker(
            bus,
            t.pool,
            tool_executor(t, config.tool_pool(t.name).timeout_s),
            slots=slots,
            models=[t.name],
            tools=[t.spec],
        )
        for t in tools
    ]


@dataclass
class Services:
    """A set of services sharing one stop event; `run` returns when all have drained."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    runners: list[Router | Worker] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run(self.stop)) for r in self.runners]

    async def shutdown(self) -> None:
        self.stop.set()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                log.error("service ended with %r", r)

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks)


def build(
    bus: Bus,
    config: Config,
    *,
    router: bool = True,
    pools: list[str] | None = None,
    tools: Tools | None = None,
) -> Services:
    """The services of one process: optionally the router, workers for `pools` (all if None)."""
    s = Services()
    if router:
        s.runners.append(Router(bus, config))
    for p in config.pools:
        if pools is None or p.name in pools:
            s.runners.append(llm_worker(bus, config, p))
    if tools is not None:
        # `--pool tool.<name>` picks tools (one Deployment per tool pool); none named: all.
        named = {p for p in pools or () if p.startswith("tool.")}
        picked = [t for t in tools if not named or t.pool in named]
        s.runners += tool_workers(bus, picked, config=config)
    return s
