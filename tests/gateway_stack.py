"""A live deployment for the gateway tests: real nats-server, two router processes, a worker
process per pool, two `chainyard gateway` processes, and sandbox providers in the test.

Pools: `primary` (cheapest) and `backup` both serve `gpt-4o-mini`; group `small` is primary +
backup; `slow` answers after 3 s (deadlines); `flaky` (cheapest) and `spare` both serve
`ha-model`, for the failover test to darken `flaky` without opening a breaker that other tests
route through. Two worker processes serve them: primary + flaky, and backup + spare + slow.
Keys: `sk-acme` (tenant acme, every model), `sk-globex` (tenant globex), `sk-narrow` (tenant
acme, only `backup-mini`). Providers need `PROVIDER_KEY`; no answer may ever contain it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from helpers import Events, start_cli, start_routers, stop_all, wait_until

from chainyard.contracts import ChainCancelled
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

PROVIDER_KEY = "sk-provider-secret-7f3a9c0d1e2b4a5f"
KEYS = {"acme": "sk-acme", "globex": "sk-globex", "narrow": "sk-narrow"}
POOLS = ("primary", "backup", "slow", "flaky", "spare")
WORKERS = (("primary", "flaky"), ("backup", "spare", "slow"))


def config_toml(urls: dict[str, str]) -> str:
    pools = "".join(
        f"""
[[pools]]
name = "{name}"
provider = "openai"
base_url = "{url}/v1"
api_key_env = "GW_PROVIDER_KEY"
slots = 64
timeout_s = 30
"""
        for name, url in urls.items()
    )
    return f"""
strategy = "cheapest"
breaker_failures = 2
breaker_cooldown_s = 30
capacity_wait_s = 10

[[deployments]]
name = "primary-mini"
pool = "primary"
model = "gpt-4o-mini"
capabilities = ["tools", "json", "streaming"]
price = {{ input_per_mtok = 0.15, output_per_mtok = 0.6 }}

[[deployments]]
name = "backup-mini"
pool = "backup"
model = "gpt-4o-mini"
capabilities = ["tools", "json", "streaming"]
price = {{ input_per_mtok = 1.5, output_per_mtok = 6.0 }}

[[deployments]]
name = "slow-model"
pool = "slow"
model = "slow-model"
price = {{ input_per_mtok = 0.0, output_per_mtok = 0.0 }}

[[deployments]]
name = "flaky-ha"
pool = "flaky"
model = "ha-model"
price = {{ input_per_mtok = 0.15, output_per_mtok = 0.6 }}

[[deployments]]
name = "spare-ha"
pool = "spare"
model = "ha-model"
price = {{ input_per_mtok = 1.5, output_per_mtok = 6.0 }}

[groups]
small = ["primary-mini", "backup-mini"]
{pools}"""


@dataclass
class Stack:
    nats: NatsServer
    bus: Bus
    sandboxes: dict[str, SandboxServer]
    gateways: list[str]  # base URLs (no /v1)
    logs: Path
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.gateways[0]

    def v1(self, i: int = 0) -> str:
        return self.gateways[i] + "/v1"

    def logs_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


async def _gateway_url(log: Path, proc: asyncio.subprocess.Process) -> str:
    found: list[str] = []

    def listening() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"the gateway exited: {log.read_text()}")
        m = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if m:
            found.append(m.group(1))
        return bool(found)

    await wait_until(listening, 30, f"the gateway's URL in {log}")
    return found[0]


@contextlib.asynccontextmanager
async def live_stack(tmp: Path, gateways: int = 2) -> AsyncIterator[Stack]:
    os.environ["GW_PROVIDER_KEY"] = PROVIDER_KEY  # the worker processes inherit it
    async with contextlib.AsyncExitStack() as stack:
        nats = await stack.enter_async_context(NatsServer())
        sandboxes = {}
        for name in POOLS:
            latency = 3000.0 if name == "slow" else 0.0
            sb = SandboxServer(SandboxConfig(api_key=PROVIDER_KEY, latency_ms=latency))
            sandboxes[name] = await stack.enter_async_context(sb)
        cfg = tmp / "chainyard.toml"
        cfg.write_text(config_toml({n: s.url for n, s in sandboxes.items()}))
        bus = await open_bus(nats.url, name="gateway-test")
        stack.push_async_callback(bus.close)
        procs: list[asyncio.subprocess.Process] = []

        stack.push_async_callback(lambda: stop_all(procs))
        common = ("--nats", nats.url, "--config", str(cfg))
        procs += await start_routers(tmp, nats.url, cfg)
        for i, pools in enumerate(WORKERS):
            flags = [f"--pool={p}" for p in pools]
            procs.append(await start_cli(tmp / f"worker-{i}.log", "worker", *common, *flags))
        keys = [
            f"--key={KEYS['acme']}=acme",
            f"--key={KEYS['globex']}=globex",
            f"--key={KEYS['narrow']}=acme:backup-mini",
        ]
        urls = []
        for i in range(gateways):
            log = tmp / f"gateway-{i}.log"
            proc = await start_cli(
                log, "gateway", *common, "--port", "0", "--max-body-kb", "64", *keys
            )
            procs.append(proc)
            urls.append(await _gateway_url(log, proc))
        s = Stack(nats=nats, bus=bus, sandboxes=sandboxes, gateways=urls, logs=tmp, procs=procs)
        await _warm(s)
        yield s


async def _warm(s: Stack) -> None:
    """Wait until every pool has a worker the routers see: a request through each gateway to
    each pool answers."""
    async with httpx.AsyncClient(timeout=60) as http:
        for base in s.gateways:
            for model in ("primary-mini", "backup-mini", "flaky-ha", "spare-ha"):
                r = await http.post(
                    f"{base}/v1/chat/completions",
                    headers={"authorization": f"Bearer {KEYS['acme']}"},
                    json={"model": model, "messages": [{"role": "user", "content": "warm up"}]},
                )
                assert r.status_code == 200, r.text


@contextlib.asynccontextmanager
async def slow_chunks(s: Stack, pool: str = "primary") -> AsyncIterator[None]:
    """The pool's sandbox streams a chunk every 300 ms for a while: time to act mid-stream."""
    await s.sandboxes[pool].configure(chunk_delay_ms=300.0)
    try:
        yield
    finally:
        await s.sandboxes[pool].configure(chunk_delay_ms=0.0)


async def hang_up_mid_stream(
    s: Stack, path: str, body: dict[str, object], streaming: Callable[[str], bool]
) -> ChainCancelled:
    """POST a streamed request (tenant acme), close the connection at the first line that
    `streaming` accepts, and return the cancel of the request's chain that follows."""
    async with slow_chunks(s), Events(s.bus.nc, "cy.events.acme.>") as ev:
        async with httpx.AsyncClient(timeout=30) as http:
            headers = {"authorization": f"Bearer {KEYS['acme']}"}
            async with http.stream("POST", s.v1() + path, headers=headers, json=body) as r:
                chain_id = r.headers["x-chainyard-chain-id"]
                async for line in r.aiter_lines():
                    if streaming(line):
                        break
        # the connection is closed here, mid-stream
        cancelled = await ev.wait(
            lambda e: isinstance(e, ChainCancelled) and e.chain_id == chain_id, 20
        )
    assert isinstance(cancelled, ChainCancelled)
    return cancelled
