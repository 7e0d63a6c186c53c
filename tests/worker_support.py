"""Helpers for the worker tests: a config for one sandbox-backed pool, assignments, workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import start_cli

from chainyard.contracts import (
    Assignment,
    Config,
    Deployment,
    LlmStep,
    Message,
    Output,
    Params,
    PoolConfig,
    Price,
    Target,
    encode,
    now_ms,
)
from chainyard.runtime.nats import Bus
from chainyard.stack import llm_worker
from chainyard.workers.runtime import Result, Worker

TENANT = "acme"
POOL = "sim"
FREE = Price(input_per_mtok=0.0, output_per_mtok=0.0)


def config(
    sandbox_url: str,
    *,
    slots: int = 8,
    ack_wait_s: float = 30.0,
    extra: list[Deployment] | None = None,
) -> Config:
    return Config(
        work_ack_wait_s=ack_wait_s,
        deployments=[Deployment(name="d-free", pool=POOL, model="m", price=FREE), *(extra or [])],
        pools=[
            PoolConfig(
                name=POOL,
                provider="openai",
                base_url=f"{sandbox_url}/v1",
                slots=slots,
                timeout_s=30,
            )
        ],
    )


def toml(
    sandbox_url: str,
    *,
    slots: int = 8,
    ack_wait_s: float = 30.0,
    pool: str = POOL,
    deployment: str = "d-free",
    price: tuple[float, float] = (0.0, 0.0),
) -> str:
    """A config file's text: one pool on the sandbox, one deployment of model `m` on it (price:
    USD per million input, output tokens). It ends in the pool's table: text added after it
    (`[pools.scale]`) is the pool's; top-level keys go before it."""
    return f"""
work_ack_wait_s = {ack_wait_s}

[[deployments]]
name = "{deployment}"
pool = "{pool}"
model = "m"
price = {{ input_per_mtok = {price[0]}, output_per_mtok = {price[1]} }}

[[pools]]
name = "{pool}"
provider = "openai"
base_url = "{sandbox_url}/v1"
slots = {slots}
timeout_s = 30
"""


def assignment(
    chain_id: str,
    step_id: str = "s",
    text: str = "hello there world",
    *,
    deployment: str = "d-free",
    model: str = "m",
    deadline_at_ms: int | None = None,
    stream: bool = False,
    tenant: str = TENANT,
) -> Assignment:
    return Assignment(
        chain_id=chain_id,
        step_id=step_id,
        attempt=1,
        tenant=tenant,
        step=LlmStep(
            id=step_id,
            model=model,
            messages=[Message(role="user", content=text)],
            params=Params(stream=stream),
        ),
        target=Target(deployment=deployment, pool=POOL, provider="openai", model=model),
        dispatched_at_ms=now_ms(),
        deadline_at_ms=deadline_at_ms,
    )


async def publish(bus: Bus, *assignments: Assignment) -> None:
    for a in assignments:
        await bus.js.publish(bus.subjects.work(POOL), encode(a), headers={"Nats-Msg-Id": a.msg_id})


class HeldCalls:
    """A worker's `execute` without a provider: it counts its calls, sets `entered`, and holds
    each call until `release` is set (at once with `held=False`), then answers "done"."""

    def __init__(self, *, held: bool = True) -> None:
        self.calls = 0
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        if not held:
            self.release.set()

    async def __call__(self, a: Assignment, on_delta: object) -> Result:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return Result(output=Output(text="done"))


def worker(bus: Bus, cfg: Config, **kw: object) -> Worker:
    return llm_worker(bus, cfg, cfg.pool(POOL), **kw)


async def work_state(bus: Bus) -> tuple[int, int, int]:
    """(messages left in the work stream, ack pending, redelivered) of the pool's consumer."""
    topo = bus.topology
    info = await bus.js.consumer_info(topo.work.name, topo.pool_consumer(POOL).durable)
    stream = await bus.js.stream_info(topo.work.name)
    return stream.state.messages, info.num_ack_pending, info.num_redelivered


async def start_worker_process(
    url: str, config_path: Path, log: Path, pool: str = POOL
) -> asyncio.subprocess.Process:
    args = ["worker", "--nats", url, "--config", str(config_path), "--pool", pool]
    return await start_cli(log, *args)


async def live_workers(bus: Bus) -> set[str]:
    """Worker ids with a heartbeat for the pool."""
    try:
        keys = await bus.capacity.keys()
    except Exception:  # NoKeysError: none yet
        return set()
    return {k.split(".", 1)[1] for k in keys if k.startswith(f"{POOL}.")}
