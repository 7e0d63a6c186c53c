"""The cached routing decision (`Policy.choose`) against the reference loop (`_choose_slow`):
the same picks, costs, reasons and side effects over randomized capacity, breakers, budgets,
deadlines and route constraints, while the views change between picks."""

from __future__ import annotations

import random
from typing import Any

from chainyard.contracts import (
    Config,
    Deployment,
    LlmStep,
    Message,
    Params,
    PoolConfig,
    Price,
    Route,
    RouterConfig,
)
from chainyard.router.breakers import Breaker, Breakers
from chainyard.router.capacity import CapacityView, DeploymentStats, PoolLoad
from chainyard.router.catalog import Catalog
from chainyard.router.policy import Ctx, Policy

T = 1_000_000
STRATEGIES = ("cheapest", "fastest", "balanced", "weighted")


def world(seed: int) -> tuple[Policy, Any]:
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    deps = [
        Deployment(
            name=f"d{i}",
            pool=f"p{rng.randint(0, 3)}",
            model="m",
            price=Price(
                input_per_mtok=rng.choice([0.0, 1.0, rng.uniform(0.1, 10)]),
                output_per_mtok=rng.choice([0.0, 2.0, rng.uniform(0.1, 30)]),
            ),
            context_window=rng.choice([60, 500, 8192]),
            capabilities=rng.choice([[], ["json"], ["json", "tools"]]),
            weight=rng.choice([0.0, 1.0, 3.0]),
            expected_latency_ms=rng.choice([None, 100.0, 900.0]),
        )
        for i in range(n)
    ]
    # Regions from their own generator: the draws above stay as they were.
    where = random.Random(-seed)
    regions = [None, "eu", "us"]
    cfg = Config(
        deployments=deps,
        groups={"g": [d.name for d in deps]},
        strategy=rng.choice(STRATEGIES),
        breaker_probes=1,
        pools=[PoolConfig(name=f"p{i}", region=where.choice(regions)) for i in range(4)],
        router=RouterConfig(
            region=where.choice(regions), cross_region_margin=where.choice([0.0, 0.2, 0.9])
        ),
    )  # type: ignore[arg-type]
    cap = CapacityView(None)  # type: ignore[arg-type]
    brk = Breakers(None, cfg)  # type: ignore[arg-type]
    policy = Policy(Catalog(cfg, cap.seen), cap, cfg, brk, random.Random(seed))
    return policy, (cfg, cap, brk)


def mutate(rng: random.Random, parts: Any, t: int) -> None:
    cfg, cap, brk = parts
    pools = sorted({d.pool for d in cfg.deployments})
    for p in pools:
        if p not in cap.pools or rng.random() < 0.3:
            cap.pools[p] = PoolLoad(
                live_until_ms=t + rng.choice([-5, 0, 3, 500]),
                slots_total=rng.choice([0, 2, 10]),
                slots_free=rng.choice([0, 1, 5]),
                pending=rng.choice([0, 0, 3]),
            )
        elif rng.random() < 0.3:
            cap.pools[p].slots_free = rng.choice([0, 1, 5])  # in place: read on every pick
    for d in cfg.deployments:
        r = rng.random()
        if r < 0.2:
            cap.stats[d.name] = DeploymentStats(
                latency_ms=rng.choice([None, 50.0, 400.0, 3000.0]),
                throttled_until_ms=rng.choice([0, t + 2, t - 2]),
            )
        elif r < 0.25:
            cap.stats.pop(d.name, None)
        r = rng.random()
        if r < 0.15:
            brk._set(
                d.name,
                Breaker(
                    status=rng.choice(["closed", "open"]),
                    open_until_ms=t + rng.choice([-3, 4]),
                    cooled_until_ms=t + rng.choice([-3, 0, 2]),
                    at_ms=t,
                ),
            )
        elif r < 0.2:
            brk.local.pop(d.name, None)  # an operator deleted the key: no on_change
    for p in pools:
        if rng.random() < 0.2:
            cap.note_result(p)


def steps(rng: random.Random) -> tuple[LlmStep, list[str], Ctx, int]:
    route = Route(
        strategy=rng.choice([None, *STRATEGIES]),
        max_cost_usd=rng.choice([None, None, 1e-4, 1e-2]),
        prefer=rng.choice([[], ["p1"], ["d0", "d3"]]),
        avoid=rng.choice([[], [], ["p2"], ["d1"]]),
        capabilities=rng.choice([[], [], ["json"]]),
    )
    s = LlmStep(
        id="s",
        model=rng.choice(["g", "g", "g", "m", "d2", "nope"]),
        messages=[Message(role="user", content="x" * rng.choice([8, 8, 120, 800]))],
        params=Params(max_tokens=rng.choice([None, 16, 64])),
        route=route,
    )
    exclude = rng.choice([[], [], ["d0"], ["d1", "d2"]])
    ctx = Ctx(
        left_usd=rng.choice([None, None, 1e-5, 1e-3, 1.0]),
        deadline_at_ms=rng.choice([None, None, 500, 2000]),
        min_context=rng.choice([0, 0, 0, 100]),
    )
    return s, exclude, ctx, rng.choice([0, 1, 2, 4])


def test_cached_decision_equals_the_reference_loop() -> None:
    for seed in range(300):
        fast, fparts = world(seed)
        slow, sparts = world(seed)
        rng = random.Random(10_000 + seed)
        t = T
        for _ in range(25):
            mseed = rng.random()
            mutate(random.Random(mseed), fparts, t)
            mutate(random.Random(mseed), sparts, t)
            s, exclude, ctx, dt = steps(rng)
            t += dt
            fctx = Ctx(
                left_usd=ctx.left_usd,
                deadline_at_ms=None if ctx.deadline_at_ms is None else t + ctx.deadline_at_ms,
                now_ms=t,
                min_context=ctx.min_context,
            )
            sctx = Ctx(
                left_usd=fctx.left_usd,
                deadline_at_ms=fctx.deadline_at_ms,
                now_ms=t,
                min_context=fctx.min_context,
            )
            for _ in range(rng.choice([1, 3])):  # repeats hit the cached plans
                got = fast.choose(s, exclude, fctx)
                want = slow._choose_slow(s, exclude, sctx)
                norm = [x if isinstance(x, str) else (x[0].name, x[1]) for x in (got, want)]
                assert norm[0] == norm[1], (seed, s, exclude, fctx)
                assert type(got) is type(want)
            assert dict(fparts[1]._sent) == dict(sparts[1]._sent) or {
                k: v for k, v in fparts[1]._sent.items() if v
            } == {k: v for k, v in sparts[1]._sent.items() if v}
            assert fparts[2]._probes == sparts[2]._probes
