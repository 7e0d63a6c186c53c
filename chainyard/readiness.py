"""What `/readyz` checks for the services of one process (runtime/probes.py serves it).

- `stopping`: the process has not been told to stop (SIGTERM: it drains, not ready).
- `nats`: the connection is up (not reconnecting, not closed).
- `consumers`: JetStream answers for every durable consumer the process's router and workers
  bind, and each one exists on its stream (a consumer info per durable).
- `provider:<pool>` (an LLM worker): a TCP connection to the provider's host (or the proxy the
  pool goes through) opens, or, if not, the router already keeps a breaker for one of the
  pool's deployments in KV (the outage is known and routed around, so this worker is no reason
  to hold a rollout). The null provider and tool pools have nothing to reach.

Sits on top, with the CLI: it knows the router's and the workers' consumers.
"""

from __future__ import annotations

import asyncio
import contextlib

from nats.js.errors import KeyNotFoundError
from yarl import URL

from chainyard.contracts import Config, ConsumerDef, PoolConfig, StreamDef
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus
from chainyard.runtime.probes import Check
from chainyard.stack import Services
from chainyard.workers.providers._http import env_proxy
from chainyard.workers.runtime import Worker

CONNECT_TIMEOUT_S = 1.5
DEFAULT_PORTS = {"http": 80, "https": 443}


def checks(bus: Bus, config: Config, services: Services) -> dict[str, Check]:
    """The checks of the process running `services` (their runners) with `config`."""
    topo = bus.topology
    bound: list[tuple[StreamDef, ConsumerDef]] = []
    out: dict[str, Check] = {
        "stopping": lambda: _running(services),
        "nats": lambda: _connected(bus),
    }
    for r in services.runners:
        if isinstance(r, Router):
            bound += [
                (topo.intake, topo.intake_consumer),
                (topo.events, topo.engine_consumer),
                (topo.intake, topo.control_consumer),
                (topo.timers, topo.timers_consumer),
                (topo.timers, topo.deadlines_consumer),
            ]
        elif isinstance(r, Worker):
            bound.append((topo.work, topo.pool_consumer(r.pool)))
    out["consumers"] = lambda: _consumers(bus, bound)
    served = {r.pool for r in services.runners if isinstance(r, Worker)}
    for pool in config.pools:
        if pool.name in served and pool.provider != "null":
            names = [d.name for d in config.deployments if d.pool == pool.name]
            out[f"provider:{pool.name}"] = lambda p=pool, n=names: _provider(bus, p, n)
    return out


async def _running(services: Services) -> str | None:
    # Told to stop (SIGTERM): draining the calls in flight, taking no new work.
    return "draining before exit" if services.stop.is_set() else None


async def _connected(bus: Bus) -> str | None:
    nc = bus.nc
    if nc.is_connected:
        return None
    state = "reconnecting" if nc.is_reconnecting else "closed" if nc.is_closed else "connecting"
    return f"not connected ({state})"


async def _consumers(bus: Bus, bound: list[tuple[StreamDef, ConsumerDef]]) -> str | None:
    if not bus.nc.is_connected:
        return "NATS not connected"

    async def missing(stream: StreamDef, consumer: ConsumerDef) -> str | None:
        try:
            await bus.js.consumer_info(stream.name, consumer.durable, timeout=1.0)
        except Exception as e:  # not found, no JetStream, timeout: not bound
            return f"{stream.name}/{consumer.durable} ({type(e).__name__})"
        return None

    found = await asyncio.gather(*(missing(s, c) for s, c in bound))
    gone = [m for m in found if m]
    return f"not bound: {', '.join(gone)}" if gone else None


def provider_address(pool: PoolConfig) -> tuple[str, int] | None:
    """Where a call of the pool's first connects: its proxy when one applies, else its host."""
    if not pool.base_url:
        return None
    url = URL(pool.base_url)
    proxy = pool.proxy or env_proxy(url)
    target = URL(proxy) if proxy else url
    if not target.host:
        return None
    return target.host, target.port or DEFAULT_PORTS.get(target.scheme, 443)


async def _provider(bus: Bus, pool: PoolConfig, deployments: list[str]) -> str | None:
    where = provider_address(pool)
    if where is None:
        return "no base_url to reach"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(*where)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None
    except (OSError, TimeoutError) as e:
        why = str(e) or type(e).__name__
    for name in deployments:
        try:
            await bus.breakers.get(name)
        except KeyNotFoundError:
            continue
        return None  # the router keeps this deployment's breaker and routes by it
    return f"unreachable at {where[0]}:{where[1]} ({why}) and no breaker known for it"
