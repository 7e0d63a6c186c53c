"""Horizontal scale: steps per second with more worker processes on one pool, and with more
router replicas, each as a ratio to one process measured in the same run, with the CPU per
step of every process kind at each count (from /proc).

Every process is separate: nats-server (one node), `chainyard worker` and `chainyard router`
processes (the null provider: answers at once, in process, so the figures are the cost of
everything around the call), and this driver, which counts events on a core subscription.
Nothing is pinned: on a machine with fewer cores than processes the figures show contention,
not scale; the CPU per step says what more cores would give (docs/SCALING.md).

- `scale_workers_{2,4}_vs_1`: steps/s of N worker processes (256 slots each) draining one
  pool's queue of preloaded assignments (published once every worker has a heartbeat), from
  the first completion to the last; baseline the same with one process.
- `scale_routers_{2,3}_vs_1`: steps/s of whole chains (two steps, the second referring to the
  first) submitted at once to N router replicas, two worker processes serving the pool;
  baseline one router.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chainyard.contracts import Chain, LlmStep, Message, encode
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer

from .core import Ctx, Figure, benchmark
from .workers import POOL, TENANT, Completions, _stop, assignments, cpu_s, preload

CONFIG = f"""
[[deployments]]
name = "d"
pool = "{POOL}"
model = "gpt-4o-mini"
price = {{ input_per_mtok = 0.15, output_per_mtok = 0.6 }}

[[pools]]
name = "{POOL}"
provider = "null"
slots = 256
"""


@contextlib.asynccontextmanager
async def processes(
    nats_url: str, config: Path, commands: list[list[str]]
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`chainyard -v <command> --nats URL --config FILE`, one process each, logs beside the
    config; stopped (SIGTERM, drained) on the way out."""
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i, cmd in enumerate(commands):
            args = ["-m", "chainyard.cli", "-v", *cmd, "--nats", nats_url, "--config", str(config)]
            with (config.parent / f"{i:02d}-{cmd[0]}.log").open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, *args, stdout=log, stderr=asyncio.subprocess.STDOUT
                )
            procs.append(proc)
        yield procs
    finally:
        await asyncio.gather(*(_stop(p) for p in procs))


async def _until(check: Any, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {limit_s} s")
        await asyncio.sleep(0.05)


async def _workers_up(bus: Bus, n: int) -> None:
    async def up() -> bool:
        with contextlib.suppress(Exception):
            return len(await bus.capacity.keys()) >= n
        return False

    await _until(up, 60, f"heartbeat from {n} worker(s)")


async def _routers_up(config: Path, n: int) -> None:
    async def up() -> bool:
        logs = [p.read_text(errors="replace") for p in config.parent.glob("*-router.log")]
        return sum("router serving on" in t for t in logs) >= n

    await _until(up, 60, f"{n} router(s) serving")


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    return {kind: sum(cpu_s(p) for p in ps) for kind, ps in pids.items()}


@dataclass
class Run:
    nats: NatsServer
    config: Path
    bus: Bus
    events: Completions
    procs: list[asyncio.subprocess.Process]

    async def measure(self, pids: dict[str, list[int]], load: Awaitable[None]) -> dict[str, float]:
        """CPU seconds per process kind spent from before `load` until every counted event."""
        pids = {**pids, "nats": [self.nats.pid or 0]}
        before = _cpu(pids)
        await load
        await asyncio.wait_for(self.events.done.wait(), 300)
        return {k: v - before[k] for k, v in _cpu(pids).items()}


@contextlib.asynccontextmanager
async def stack(commands: list[list[str]], counted: str, n: int) -> AsyncIterator[Run]:
    """A fresh nats-server, the service processes, and the driver counting n events on
    `counted` (a subject under the bench tenant's events)."""
    async with NatsServer() as nats:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "chainyard.toml"
            cfg.write_text(CONFIG)
            bus = await open_bus(nats.url, name="bench-driver")
            c = Completions(n)
            sub = await bus.nc.subscribe(f"cy.events.{TENANT}.{counted}", cb=c.on)
            try:
                async with processes(nats.url, cfg, commands) as procs:
                    yield Run(nats, cfg, bus, c, procs)
            finally:
                await sub.unsubscribe()
                await bus.close()


def _per_step(cpu: dict[str, float], steps: int) -> dict[str, float]:
    return {f"{k}_cpu_us_per_step": round(1e6 * v / steps, 1) for k, v in cpu.items()}


async def workers_run(n_workers: int, n: int) -> dict[str, Any]:
    """n steps, published once every worker has a heartbeat, drained by n_workers processes."""
    async with stack([["worker", "--pool", POOL]] * n_workers, "*.step.*", n) as run:
        await _workers_up(run.bus, n_workers)
        tag = f"w{n_workers}-"
        load = preload(run.bus, assignments(n, tag), tag)
        cpu = await run.measure({"workers": [p.pid for p in run.procs]}, load)
    return {"processes": n_workers, "steps": n, "steps_per_s": round(run.events.per_s, 1),
            **_per_step(cpu, n)}  # fmt: skip


def _chain(i: int) -> Chain:
    a = Message(role="user", content=f"plan {i}")
    b = Message(role="user", content="then {{steps.a.output}}")
    return Chain(
        id=f"c{i:06d}",
        steps=[
            LlmStep(id="a", model="gpt-4o-mini", messages=[a]),
            LlmStep(id="b", model="gpt-4o-mini", messages=[b]),
        ],
    )


async def _submit(bus: Bus, chains: int) -> None:
    subject = bus.subjects.submit(TENANT)
    for start in range(0, chains, 500):
        batch = range(start, min(chains, start + 500))
        await asyncio.gather(*(bus.js.publish(subject, encode(_chain(i))) for i in batch))


async def routers_run(n_routers: int, chains: int, workers: int = 2) -> dict[str, Any]:
    """`chains` two-step chains submitted at once to n_routers replicas."""
    cmds = [["worker", "--pool", POOL]] * workers + [["router"]] * n_routers
    async with stack(cmds, "*.chain.*", chains) as run:
        await _workers_up(run.bus, workers)
        await _routers_up(run.config, n_routers)
        pids = {
            "routers": [p.pid for p in run.procs[workers:]],
            "workers": [p.pid for p in run.procs[:workers]],
        }
        cpu = await run.measure(pids, _submit(run.bus, chains))
    steps_per_s = round(2 * run.events.per_s, 1)
    return {"routers": n_routers, "workers": workers, "chains": chains,
            "steps_per_s": steps_per_s, **_per_step(cpu, 2 * chains)}  # fmt: skip


def _figures(prefix: str, runs: list[dict[str, Any]], key: str, base: str) -> list[Figure]:
    one = runs[0]
    cond = {"cores": os.cpu_count(), "provider": "null", "nats": "one node, R1",
            "runs": runs, "pinned": False}  # fmt: skip
    return [
        Figure(f"{prefix}_{r[key]}_vs_1", r["steps_per_s"], "steps/s", base, one["steps_per_s"],
               cond)
        for r in runs[1:]
    ]  # fmt: skip


@benchmark("scaling", ("scale_workers_2_vs_1", "scale_workers_4_vs_1",
                       "scale_routers_2_vs_1", "scale_routers_3_vs_1"))  # fmt: skip
async def scaling(ctx: Ctx) -> list[Figure]:
    """Steps/s with 1, 2, 4 worker processes on one pool and with 1, 2, 3 routers (null
    provider), as ratios to one process, with CPU per step per process kind."""
    n = ctx.n("scale_steps", 40_000, 5_000)
    chains = ctx.n("scale_chains", 5_000, 2_000)
    workers = [await workers_run(k, n) for k in (1, 2, 4)]
    routers = [await routers_run(k, chains) for k in (1, 2, 3)]
    for r in (*workers, *routers):
        cpu = ", ".join(f"{k.removesuffix('_cpu_us_per_step')} {v:.0f}"
                        for k, v in r.items() if k.endswith("_cpu_us_per_step"))  # fmt: skip
        who = f"{r['processes']} worker(s)" if "processes" in r else f"{r['routers']} router(s)"
        ctx.notes.append(f"scaling: {who}: {r['steps_per_s']:.0f} steps/s; CPU us/step: {cpu}")
    return [
        *_figures("scale_workers", workers, "processes", "one_worker_process"),
        *_figures("scale_routers", routers, "routers", "one_router"),
    ]
