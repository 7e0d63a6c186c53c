"""Routing figures: decision cost, failover time, and the latency the whole path adds.

- routing_decision_us_50_deployments: one Policy.choose over a group of 50 deployments (10
  pools, live capacity and latency stats), against msgspec-decoding one Assignment. Repeated
  picks of one step hit the policy's caches; the conditions add the cost when the step's
  prompt length is new (costs computed for it) and right after a heartbeat (snapshot rebuilt).
- failover_reroute_ms: a sandbox provider goes dark under steady load; time from the switch
  to the first step that completes on the other deployment, against the step p50 before.
(added_latency_p50_ms / _p99_ms are in bench/added_latency.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from typing import Any

from chainyard.contracts import (
    Assignment,
    ChainCompleted,
    Config,
    Deployment,
    LlmStep,
    Message,
    Params,
    PoolConfig,
    Price,
    StepCompleted,
    Target,
    assignment_decoder,
    encode,
    event_decoder,
)
from chainyard.router.capacity import CapacityView, DeploymentStats, PoolLoad
from chainyard.router.catalog import Catalog
from chainyard.router.engine import Router
from chainyard.router.policy import Ctx, Policy
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox.providers import SandboxConfig, SandboxServer
from chainyard.stack import llm_worker

from .core import Ctx as BenchCtx
from .core import Figure, benchmark


def _step(text: str = "route me please") -> LlmStep:
    return LlmStep(
        id="s",
        model="g",
        messages=[Message(role="user", content=text)],
        params=Params(max_tokens=16),
    )


@benchmark("routing_decision", ("routing_decision_us_50_deployments",))
async def routing_decision(ctx: BenchCtx) -> list[Figure]:
    """Policy.choose over 50 deployments vs msgspec decode of one Assignment."""
    n = ctx.n("n", 50_000, 5_000)
    rng = random.Random(7)
    deps = [
        Deployment(
            name=f"d{i}",
            pool=f"p{i % 10}",
            model=f"m{i}",
            price=Price(input_per_mtok=rng.uniform(0.1, 10), output_per_mtok=rng.uniform(0.4, 30)),
        )
        for i in range(50)
    ]
    config = Config(deployments=deps, groups={"g": [d.name for d in deps]}, strategy="balanced")
    cap = CapacityView(None)  # type: ignore[arg-type]
    far = time.time_ns() // 1_000_000 + 3_600_000
    for i in range(10):
        cap._seen_pools.add(f"p{i}")
        cap.pools[f"p{i}"] = PoolLoad(live_until_ms=far, slots_total=10**9, slots_free=10**9)
    for d in deps:
        cap.stats[d.name] = DeploymentStats(latency_ms=rng.uniform(50, 2000), calls=100)
    policy = Policy(Catalog(config, cap.seen), cap, config, None, random.Random(1))
    step = _step()
    c = Ctx(now_ms=far - 1000)
    for _ in range(1000):
        policy.choose(step, [], c)
    with ctx.profiled("routing_decision"):
        t0 = time.perf_counter()
        for _ in range(n):
            policy.choose(step, [], c)
        per_pick = (time.perf_counter() - t0) / n * 1e6
    # The same pick when its inputs are new: every step a different prompt length (no cached
    # costs for it), and a heartbeat before every pick (the live snapshot is rebuilt).
    m = max(n // 10, 500)
    fresh = [_step("x" * (16 + 4 * i)) for i in range(m)]
    t0 = time.perf_counter()
    for s in fresh:
        policy.choose(s, [], c)
    new_prompt = (time.perf_counter() - t0) / m * 1e6
    t0 = time.perf_counter()
    for _ in range(m):
        cap.version += 1
        policy.choose(step, [], c)
    after_beat = (time.perf_counter() - t0) / m * 1e6
    a = Assignment(
        chain_id="c",
        step_id="s",
        attempt=1,
        tenant="t",
        step=step,
        target=Target(deployment="d0", pool="p0", provider="openai", model="m0"),
        dispatched_at_ms=1,
    )
    raw = encode(a)
    for _ in range(1000):
        assignment_decoder.decode(raw)
    t0 = time.perf_counter()
    for _ in range(n):
        assignment_decoder.decode(raw)
    per_decode = (time.perf_counter() - t0) / n * 1e6
    cond = {
        "N": n,
        "deployments": 50,
        "pools": 10,
        "strategy": "balanced",
        "assignment_bytes": len(raw),
        "goal_us": 20,
        "new_prompt_length_us": round(new_prompt, 2),
        "after_heartbeat_us": round(after_beat, 2),
    }
    return [
        Figure(
            "routing_decision_us_50_deployments",
            per_pick,
            "us",
            "msgspec_decode_assignment_us",
            per_decode,
            cond,
        )
    ]


class _Stack:
    """Embedded NATS, two sandbox providers (a cheap, b dear), a router and a worker per pool."""

    def __init__(self, slots: int = 64) -> None:
        self.slots = slots
        self.stack = contextlib.AsyncExitStack()
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.done: dict[str, asyncio.Future[Any]] = {}
        self.step_done: list[StepCompleted] = []

    async def __aenter__(self) -> _Stack:
        server = await self.stack.enter_async_context(NatsServer())
        self.sb = {
            n: await self.stack.enter_async_context(SandboxServer(SandboxConfig(capture=0)))
            for n in "ab"
        }
        self.bus = await open_bus(server.url, name="bench-routing")
        prices = {
            "a": Price(input_per_mtok=1, output_per_mtok=2),
            "b": Price(input_per_mtok=5, output_per_mtok=10),
        }
        self.config = Config(
            strategy="cheapest",
            deployments=[Deployment(name=n, pool=n, model=f"m-{n}", price=prices[n]) for n in "ab"],
            pools=[
                PoolConfig(name=n, base_url=f"{s.url}/v1", slots=self.slots)
                for n, s in self.sb.items()
            ],
            groups={"g": ["a", "b"]},
            breaker_failures=3,
        )
        self.router = Router(self.bus, self.config)
        services = [
            self.router,
            *(llm_worker(self.bus, self.config, p, heartbeat_s=0.5) for p in self.config.pools),
        ]
        self.tasks = [asyncio.create_task(s.run(self.stop)) for s in services]
        await self.bus.nc.subscribe("cy.events.>", cb=self._on_event)
        deadline = time.monotonic() + 10
        while not all(self.router.capacity.has_workers(p) for p in "ab"):
            if time.monotonic() > deadline:
                raise RuntimeError("no heartbeats")
            await asyncio.sleep(0.02)
        return self

    async def _on_event(self, msg: Any) -> None:
        try:
            ev = event_decoder.decode(msg.data)
        except Exception:
            return
        if isinstance(ev, StepCompleted):
            self.step_done.append(ev)
        elif (fut := self.done.get(getattr(ev, "chain_id", ""))) is not None and not fut.done():
            fut.set_result((time.perf_counter(), ev))

    async def run_chain(self, cid: str) -> float:
        from chainyard.contracts import Chain

        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.done[cid] = fut
        t0 = time.perf_counter()
        c = Chain(id=cid, steps=[_step("hi")])
        await self.bus.js.publish("cy.submit.bench", encode(c), headers={"Nats-Msg-Id": cid})
        t1, ev = await asyncio.wait_for(fut, 30)
        del self.done[cid]
        if not isinstance(ev, ChainCompleted):
            raise RuntimeError(f"{cid}: {ev}")
        return (t1 - t0) * 1000

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.bus.close()
        await self.stack.aclose()


@benchmark("failover", ("failover_reroute_ms",))
async def failover(ctx: BenchCtx) -> list[Figure]:
    """A provider goes dark under load: time to the first step completed elsewhere."""
    window = ctx.n("window", 16, 8)
    async with _Stack() as s:
        before: list[float] = []
        stop_load = asyncio.Event()
        seq = iter(range(10**9))

        async def load() -> None:
            while not stop_load.is_set():
                before.append(await s.run_chain(f"fo-{next(seq)}"))

        tasks = [asyncio.create_task(load()) for _ in range(window)]
        while len(before) < ctx.n("warm", 400, 100):  # noqa: ASYNC110 - measuring, 10 ms polls
            await asyncio.sleep(0.01)
        assert not any(e.target.pool == "b" for e in s.step_done), "b used before the failure"
        p50_before = statistics.median(before)
        seen = len(s.step_done)
        t_dark = time.perf_counter()
        await s.sb["a"].configure(dark=True)
        while not any(e.target.pool == "b" for e in s.step_done[seen:]):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        took = (time.perf_counter() - t_dark) * 1000
        stop_load.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    cond = {
        "window": window,
        "strategy": "cheapest (a cheap, b dear)",
        "dark_mode": "503",
        "goal_ms": 1000,
        "measured": "configure(dark) -> first step.completed on b seen by a core subscription",
    }
    return [Figure("failover_reroute_ms", took, "ms", "step_p50_before_ms", p50_before, cond)]
