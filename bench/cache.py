"""Figures cache_hit_*: a step answered from the response cache vs the same step calling a
provider that takes 20 ms, side by side in one run.

One `chainyard router` process and one `chainyard worker` process (64 slots) on one nats-server;
the load sandbox (chainyard.sandbox.load, its own process) answers after 20 ms. Single-step
chains whose step opts in to the cache (`"cache": {"ttl_s": 3600}`) run with a window of 8 in
flight: first N distinct requests (every one a miss: the provider is called and the answer
stored), then the same N requests again (every one a hit: no work message, no provider call).
Step latency is a chain's submit -> `chain.completed` (one step: intake + the step + the end);
router CPU per step is the router process's CPU (user + system, /proc) over the phase / N.
Figures: the hit phase; baselines: the miss phase of the same run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nats.aio.msg import Msg

from chainyard.contracts import Chain, LlmStep, Message, Params, StepCache, encode
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

from .added_latency import service
from .calibrate import load_average
from .core import Ctx, Figure, benchmark
from .drive import BenchError, Completions, drive
from .workers import cpu_s, sandbox

FIGURES = (
    "cache_hit_step_latency_p50_ms",
    "cache_hit_step_latency_p99_ms",
    "cache_hit_router_cpu_us_per_step",
)
TENANT = "bench"
POOL = "p"
LATENCY_MS = 20.0
WINDOW = 8


def _config(base_url: str) -> str:
    return (
        f'[[deployments]]\nname = "d"\npool = "{POOL}"\nmodel = "gpt-4o-mini"\n'
        f'[[pools]]\nname = "{POOL}"\nprovider = "openai"\nbase_url = "{base_url}/v1"\n'
        "slots = 64\ntimeout_s = 60\n"
    )


def _chain(cid: str, question: int) -> bytes:
    step = LlmStep(
        id="ask",
        model="gpt-4o-mini",
        messages=[Message(role="user", content=f"question number {question}")],
        params=Params(max_tokens=16),
        cache=StepCache(ttl_s=3600),
    )
    return encode(Chain(id=cid, steps=[step]))


@benchmark("cache", FIGURES)
async def cache(ctx: Ctx) -> list[Figure]:
    """Step latency, router CPU: a response-cache hit vs a 20 ms provider call (lower is better)."""
    n = ctx.n("n", 1000, 100)
    load_before = load_average()
    async with (
        NatsServer() as server,
        sandbox(LATENCY_MS, None, load=True) as (base_url, _),
    ):
        bus = await open_bus(server.url, name="bench-cache")
        done = Completions()
        cached: dict[str, bool] = {}
        prefix = f"{bus.subjects.prefix}.events.{TENANT}."

        async def on_event(msg: Msg) -> None:
            chain, _, kind = msg.subject[len(prefix) :].partition(".")
            if kind == "step.completed":
                cached[chain] = b'"cached":true' in msg.data
            elif kind.startswith("chain."):
                done.done(chain, None if kind == "chain.completed" else kind)

        sub = await bus.nc.subscribe(f"{prefix}*.>", cb=on_event)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "chainyard.toml"
            cfg.write_text(_config(base_url))
            common = ("--nats", server.url, "--config", str(cfg))
            async with (
                service(["router", *common], Path(tmp), "router") as router,
                service(["worker", "--pool", POOL, *common], Path(tmp), "worker"),
            ):

                async def submit(key: str) -> None:
                    phase, _, i = key.partition("-")  # warm-up questions are not measured ones
                    question = int(i) + (n if phase == "warm" else 0)
                    await bus.js.publish(bus.subjects.submit(TENANT), _chain(key, question))

                # Both services up and their connections warm before anything is measured.
                await drive([f"warm-{i}" for i in range(20)], submit, done, WINDOW, 120)
                runs = {}
                cpu = {}
                for phase in ("miss", "hit"):
                    keys = [f"{phase}-{i}" for i in range(n)]
                    c0 = cpu_s(router.pid)
                    runs[phase] = await drive(keys, submit, done, WINDOW, timeout_s=120)
                    cpu[phase] = (cpu_s(router.pid) - c0) / n * 1e6
                    hits = sum(cached.get(k, False) for k in keys)
                    if hits != (n if phase == "hit" else 0):
                        raise BenchError(f"{phase} phase: {hits} of {n} steps were cache hits")
        await sub.unsubscribe()
        await bus.close()
    hit, miss = runs["hit"], runs["miss"]
    cond = {
        "n": n,
        "window": WINDOW,
        "provider_latency_ms": LATENCY_MS,
        "router_processes": 1,
        "hit": hit.summary(),
        "miss": miss.summary(),
        "router_cpu_us_per_step": {k: round(v, 1) for k, v in cpu.items()},
        "load_before": load_before,
        "load_after": load_average(),
    }
    return [
        Figure("cache_hit_step_latency_p50_ms", hit.pct(50), "ms",
               "provider_call_step_latency_p50_ms", miss.pct(50), cond),
        Figure("cache_hit_step_latency_p99_ms", hit.pct(99), "ms",
               "provider_call_step_latency_p99_ms", miss.pct(99), cond),
        Figure("cache_hit_router_cpu_us_per_step", cpu["hit"], "us",
               "provider_call_router_cpu_us_per_step", cpu["miss"], cond),
    ]  # fmt: skip
