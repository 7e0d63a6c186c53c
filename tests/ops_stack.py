"""A live stack for the operator tests (usage, metrics, top): two router replicas, an LLM pool
served in this process and another by a separate worker process, a tool pool, and chains of
two tenants that reuse the same chain ids, with fan-out, fan-in and metadata."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import Events, heartbeat_seen, running, start_cli

from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainFailed,
    Config,
    Deployment,
    LlmStep,
    Message,
    PoolConfig,
    Price,
    ToolStep,
    WaitStep,
    dump_config,
    encode,
)
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.stack import llm_worker, tool_workers
from chainyard.workers.tools import Tools

TENANTS = ("acme", "globex")
FEATURES = ("search", "summary")
FAST, BIG = "fast", "big"  # pools: `fast` in this process, `big` in a worker process
TERMINAL = (ChainCompleted, ChainFailed, ChainCancelled)

tools = Tools()


@tools.tool
def search(query: str) -> dict[str, list[str]]:
    """Search."""
    return {"hits": [f"{query}-hit"]}


def config(sandbox_url: str) -> Config:
    return Config(
        deployments=[
            Deployment(
                name="fast-d",
                pool=FAST,
                model="m-fast",
                price=Price(input_per_mtok=1000.0, output_per_mtok=2000.0),
            ),
            Deployment(
                name="big-d",
                pool=BIG,
                model="m-big",
                price=Price(input_per_mtok=5000.0, output_per_mtok=9000.0),
            ),
        ],
        pools=[
            PoolConfig(name=p, base_url=f"{sandbox_url}/v1", slots=8, timeout_s=10)
            for p in (FAST, BIG)
        ],
        tools=["search"],
    )


def chain(chain_id: str, n: int) -> Chain:
    """classify -> (search || draft on the big model) -> answer: fan-out and fan-in."""

    def ask(sid: str, model: str, text: str) -> LlmStep:
        return LlmStep(id=sid, model=model, messages=[Message(role="user", content=text)])

    return Chain(
        id=chain_id,
        steps=[
            ask("classify", "m-fast", f"classify request {n} " + "word " * (n % 5)),
            ToolStep(id="search", tool="search", args={"query": "{{steps.classify.output}}"}),
            ask("draft", "m-big", "draft after {{steps.classify.output}}"),
            ask("answer", "m-fast", "{{steps.search.output}} {{steps.draft.output}}"),
        ],
        metadata={"feature": FEATURES[n % 2], "user": f"u-{n % 3}"},
    )


@pytest.fixture
async def provider() -> AsyncIterator[SandboxServer]:
    """The providers' stand-in: OpenAI's wire format, 20 ms a call, no key needed."""
    async with SandboxServer(SandboxConfig(latency_ms=20)) as server:
        yield server


@dataclass
class Stack:
    bus: Bus
    url: str
    config: Config

    async def submit(self, tenant: str, chain: Chain) -> None:
        await self.bus.js.publish(self.bus.subjects.submit(tenant), encode(chain))

    async def run_chains(self, count: int, first: int = 0, timeout: float = 60.0) -> list[object]:
        """`count` chains per tenant, ids c-<first>.., the same ids for both tenants; returns
        their terminal events once all have ended."""
        ids = [f"c-{i}" for i in range(first, first + count)]
        async with Events(self.bus.nc, f"{self.bus.subjects.prefix}.events.*.*.chain.>") as ev:
            for n, cid in enumerate(ids, start=first):
                for tenant in TENANTS:
                    await self.bus.js.publish(
                        self.bus.subjects.submit(tenant), encode(chain(cid, n))
                    )
            want = len(ids) * len(TENANTS)
            await ev.wait(lambda e: isinstance(e, TERMINAL), timeout, count=want)
            return ev.matching(lambda e: isinstance(e, TERMINAL))


def waiting(chain_id: str) -> Chain:
    """A chain that stays running: its step waits for a signal nobody sends."""
    return Chain(id=chain_id, steps=[WaitStep(id="approve", signal="approve")])


def failing(chain_id: str) -> Chain:
    """A chain whose tool step raises (no `query`): it fails with a reason."""
    return Chain(id=chain_id, steps=[ToolStep(id="boom", tool="search", args={})])


@contextlib.asynccontextmanager
async def live_stack(bus: Bus, url: str, sandbox_url: str, tmp: Path) -> AsyncIterator[Stack]:
    cfg = config(sandbox_url)
    path = tmp / "chainyard.toml"
    path.write_bytes(dump_config(cfg))
    proc = await start_cli(
        tmp / "worker-big.log", "worker", "--nats", url, "--config", str(path), "--pool", BIG
    )
    services = [
        Router(bus, cfg),
        Router(bus, cfg),
        llm_worker(bus, cfg, cfg.pool(FAST)),
        *tool_workers(bus, tools, config=cfg),
    ]
    try:
        async with running(*services):
            for pool in (FAST, BIG, "tool.search"):
                await heartbeat_seen(bus.capacity, pool, timeout=30)
            yield Stack(bus, url, cfg)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()
