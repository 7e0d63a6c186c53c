"""Routing against real nats-server and sandbox providers: failover, cost, latency, 429s,
budgets, hedges, fairness, and router replicas (in process and as killed subprocesses)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Events,
    python_env,
    running,
    stored_events,
    stream_events,
    wait_until,
)

from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainFailed,
    Config,
    Deployment,
    LlmStep,
    Message,
    Params,
    PoolConfig,
    Price,
    Route,
    StepCompleted,
    encode,
    state_decoder,
)
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox.providers import SandboxServer
from chainyard.stack import llm_worker

PRICES = {
    "a": Price(input_per_mtok=1.0, output_per_mtok=2.0),
    "b": Price(input_per_mtok=10.0, output_per_mtok=20.0),
}


def config(urls: dict[str, str], **kw: Any) -> Config:
    deps = [
        Deployment(
            name=n, pool=n, model=f"m-{n}", provider="openai", price=PRICES.get(n, PRICES["b"])
        )
        for n in urls
    ]
    pools = [
        PoolConfig(name=n, provider="openai", base_url=f"{u}/v1", slots=64) for n, u in urls.items()
    ]
    return Config(deployments=deps, pools=pools, groups={"g": list(urls)}, **kw)


def chain(cid: str, n_steps: int = 1, **kw: Any) -> Chain:
    route = kw.pop("route", Route())
    steps = [
        LlmStep(
            id=f"s{i}",
            model="g",
            messages=[Message(role="user", content=f"say {i} please")],
            params=Params(max_tokens=8),
            route=route,
        )
        for i in range(n_steps)
    ]
    return Chain(id=cid, steps=steps, **kw)


@contextlib.asynccontextmanager
async def sandboxes(*names: str, **cfg: Any) -> AsyncIterator[dict[str, SandboxServer]]:
    servers = {n: SandboxServer() for n in names}
    async with contextlib.AsyncExitStack() as stack:
        for s in servers.values():
            await stack.enter_async_context(s)
        yield servers


def workers(bus: Bus, cfg: Config) -> list[Any]:
    return [llm_worker(bus, cfg, p, heartbeat_s=0.2) for p in cfg.pools]


async def submit_all(bus: Bus, chains: list[Chain], tenant: str = "t") -> None:
    await asyncio.gather(
        *(
            bus.js.publish(f"cy.submit.{tenant}", encode(c), headers={"Nats-Msg-Id": c.id})
            for c in chains
        )
    )


async def ended_all(ev: Events, ids: list[str], within: float = 30.0) -> dict[str, Any]:
    """The end of every chain in `ids`, by chain. Counted by chain, not by event: a live
    subscriber may see one end twice (a router killed before its ack publishes it again; the
    stream keeps one)."""
    want = set(ids)

    def ends() -> dict[str, Any]:
        return {
            e.chain_id: e
            for _, e in ev.received
            if isinstance(e, (ChainCompleted, ChainFailed)) and e.chain_id in want
        }

    await wait_until(lambda: len(ends()) == len(want), within, f"the end of {len(want)} chains")
    return ends()


def pools_of(ends: dict[str, Any]) -> Counter[str]:
    return Counter(s.pool for e in ends.values() if isinstance(e, ChainCompleted) for s in e.steps)


async def live(router: Router, *pools: str) -> None:
    await wait_until(lambda: all(router.capacity.has_workers(p) for p in pools), 10, "heartbeats")


async def test_dark_provider_under_load_every_chain_completes_elsewhere(bus: Bus) -> None:
    async with sandboxes("a", "b") as sb:
        cfg = config({n: s.url for n, s in sb.items()}, strategy="cheapest", breaker_failures=3)
        router = Router(bus, cfg)
        async with Events(bus.nc, "cy.events.t.>") as ev, running(router, *workers(bus, cfg)):
            await live(router, "a", "b")
            ids = [f"dark-{i}" for i in range(60)]
            await submit_all(bus, [chain(i) for i in ids[:20]])
            await ended_all(ev, ids[:20])
            await sb["a"].configure(dark=True)
            await submit_all(bus, [chain(i) for i in ids[20:]])
            ends = await ended_all(ev, ids)
        assert all(isinstance(e, ChainCompleted) for e in ends.values()), [
            e.reason for e in ends.values() if isinstance(e, ChainFailed)
        ]
        assert pools_of({i: ends[i] for i in ids[20:]})["b"] == 40
        assert router.routing.breakers.status("a").status == "open"


async def test_cost_routing_beats_round_robin_at_the_same_success(bus: Bus) -> None:
    async with sandboxes("a", "b") as sb:
        cfg = config({n: s.url for n, s in sb.items()}, strategy="weighted")
        router = Router(bus, cfg)
        async with Events(bus.nc, "cy.events.t.>") as ev, running(router, *workers(bus, cfg)):
            await live(router, "a", "b")
            rr = [chain(f"rr-{i}") for i in range(30)]
            cheap = [chain(f"cost-{i}", route=Route(strategy="cheapest")) for i in range(30)]
            await submit_all(bus, rr)
            rr_ends = await ended_all(ev, [c.id for c in rr])
            await submit_all(bus, cheap)
            cheap_ends = await ended_all(ev, [c.id for c in cheap])
        ok = [e for e in [*rr_ends.values(), *cheap_ends.values()] if isinstance(e, ChainCompleted)]
        assert len(ok) == 60  # the same success rate: all
        rr_cost = sum(e.cost_usd for e in rr_ends.values())
        cheap_cost = sum(e.cost_usd for e in cheap_ends.values())
        assert pools_of(rr_ends)["b"] > 0 and pools_of(cheap_ends)["a"] >= 20
        assert cheap_cost < rr_cost / 2


async def test_slow_provider_is_avoided_while_slow(bus: Bus) -> None:
    async with sandboxes("a", "b") as sb:
        await sb["a"].configure(latency_ms=400)
        cfg = config({n: s.url for n, s in sb.items()}, strategy="fastest")
        router = Router(bus, cfg)
        async with Events(bus.nc, "cy.events.t.>") as ev, running(router, *workers(bus, cfg)):
            await live(router, "a", "b")
            warm = [chain(f"warm-{i}") for i in range(6)]
            await submit_all(bus, warm)
            await ended_all(ev, [c.id for c in warm])
            stats = router.capacity.stats
            await wait_until(
                lambda: "a" in stats and "b" in stats and (stats["a"].latency_ms or 0) > 200,
                10,
                "latency in heartbeats",
            )
            measured = [chain(f"fast-{i}") for i in range(30)]
            for c in measured:  # one at a time: the pick sees each result's latency
                await submit_all(bus, [c])
                await ended_all(ev, [c.id])
            ends = await ended_all(ev, [c.id for c in measured])
        assert pools_of(ends)["b"] == 30


async def test_429_storm_shifts_traffic(bus: Bus) -> None:
    async with sandboxes("a", "b") as sb:
        cfg = config({n: s.url for n, s in sb.items()}, strategy="cheapest", breaker_throttles=2)
        router = Router(bus, cfg)
        async with Events(bus.nc, "cy.events.t.>") as ev, running(router, *workers(bus, cfg)):
            await live(router, "a", "b")
            await sb["a"].configure(rate_limit_for_s=30.0, retry_after_s=10.0)
            first = [f"storm-{i}" for i in range(10)]  # sent before any 429 came back: to a
            await submit_all(bus, [chain(i) for i in first])
            await ended_all(ev, first)
            sb["a"].reset_counts()
            then = [f"after-{i}" for i in range(30)]
            await submit_all(bus, [chain(i) for i in then])
            ends = {**await ended_all(ev, first), **await ended_all(ev, then)}
        assert all(isinstance(e, ChainCompleted) for e in ends.values())
        assert pools_of(ends)["b"] == 40  # the first wave failed over to b
        assert sb["a"].state.calls == 0  # once the storm was seen, no step went to a
        b = router.routing.breakers.status("a")
        assert b.status == "open" and b.cooled_until_ms > 0


async def test_budget_is_never_overspent_by_concurrent_steps(bus: Bus) -> None:
    async with sandboxes("a", "b") as sb:
        cfg = config({n: s.url for n, s in sb.items()}, strategy="fastest")
        router = Router(bus, cfg)
        # b is 10x a's price: 8 output + ~10 input tokens on b cost ~0.0003 a step:
        # 4 fit in the budget, the rest must go to a.
        async with (
            Events(bus.nc, "cy.events.t.>") as ev,
            running(router, router_b := Router(bus, cfg), *workers(bus, cfg)),
        ):
            await live(router, "a", "b")
            await live(router_b, "a", "b")
            prefer_b = Route(prefer=["b"])
            c = chain("budget-1", n_steps=12, route=prefer_b, budget_usd=0.0015)
            poor = chain("budget-2", n_steps=3, route=prefer_b, budget_usd=1e-7)
            await submit_all(bus, [c, poor])
            ends = await ended_all(ev, ["budget-1", "budget-2"])
        done = ends["budget-1"]
        assert isinstance(done, ChainCompleted), done
        assert done.cost_usd <= 0.0015
        spread = pools_of({"x": done})
        assert spread["b"] >= 1 and spread["a"] >= 1  # the remainder went to the cheaper one
        assert (
            isinstance(ends["budget-2"], ChainFailed) and "over budget" in ends["budget-2"].reason
        )


async def test_hedged_step_is_paid_once_and_counted_once(bus: Bus) -> None:
    async with sandboxes("a", "b") as sb:
        await sb["b"].configure(latency_ms=1500)
        cfg = config({n: s.url for n, s in sb.items()}, strategy="fastest")
        router = Router(bus, cfg)
        async with Events(bus.nc, "cy.events.t.>") as ev, running(router, *workers(bus, cfg)):
            await live(router, "a", "b")
            c = chain("hedge-1", route=Route(prefer=["b"], hedge_after_ms=200), budget_usd=1.0)
            await submit_all(bus, [c])
            done = (await ended_all(ev, ["hedge-1"]))["hedge-1"]
            # The slow primary answers later: that result must change nothing.
            await ev.wait(lambda e: isinstance(e, StepCompleted) and e.target.pool == "b", 10)
            late = await ev.wait(
                lambda e: isinstance(e, StepCompleted) and e.chain_id == "hedge-1", 5, count=2
            )
            assert isinstance(late, StepCompleted)
            entry = await bus.chains.get("t.hedge-1")
        assert isinstance(done, ChainCompleted)
        assert [s.pool for s in done.steps] == ["a"] and done.steps[0].attempts == 1
        st = state_decoder.decode(entry.value).steps["s0"]
        one_call = st.usage.input_tokens * 1e-6 + st.usage.output_tokens * 2e-6
        assert abs(done.cost_usd - one_call) < 1e-12 and abs(st.cost_usd - one_call) < 1e-12
        assert st.reserved_usd == 0 and st.hedge_reserved_usd == 0
        assert sb["a"].state.calls == 1 and sb["b"].state.calls == 1
        # Once in the stream (a core subscriber may also see the engine's deduplicated re-publish).
        ended = await stream_events(bus.js, "cy.events.t.hedge-1.chain.completed")
        assert len(ended) == 1


async def test_a_tenants_flood_does_not_starve_another(bus: Bus) -> None:
    async with sandboxes("a") as sb:
        await sb["a"].configure(latency_ms=20)
        cfg = config({"a": sb["a"].url}, tenant_max_outstanding=4)
        cfg = Config(
            **{
                **{f: getattr(cfg, f) for f in cfg.__struct_fields__},
                "pools": [PoolConfig(name="a", base_url=f"{sb['a'].url}/v1", slots=4)],
            }
        )
        router = Router(bus, cfg)
        async with Events(bus.nc, "cy.events.>") as ev, running(router, *workers(bus, cfg)):
            await live(router, "a")
            flood = [chain(f"flood-{i}") for i in range(80)]
            await submit_all(bus, flood, tenant="big")
            await ev.wait(
                lambda e: isinstance(e, ChainCompleted) and e.tenant == "big", 10, count=4
            )
            await submit_all(bus, [chain(f"small-{i}") for i in range(3)], tenant="small")
            await ev.wait(
                lambda e: isinstance(e, ChainCompleted) and e.tenant == "small", 20, count=3
            )
            big_done = len(
                ev.matching(lambda e: isinstance(e, ChainCompleted) and e.tenant == "big")
            )
            await ev.wait(
                lambda e: isinstance(e, ChainCompleted) and e.tenant == "big", 60, count=80
            )
        assert big_done < 60, f"the small tenant waited for {big_done} of the flood's 80 chains"


async def test_two_routers_dispatch_nothing_twice(bus: Bus) -> None:
    async with sandboxes("a", "b") as sb:
        cfg = config({n: s.url for n, s in sb.items()})
        r1, r2 = (
            Router(bus, cfg),
            Router(await open_bus(bus.nc.connected_url.geturl(), name="r2"), cfg),
        )  # type: ignore[union-attr]
        try:
            async with Events(bus.nc, "cy.events.t.>") as ev, running(r1, r2, *workers(bus, cfg)):
                await live(r1, "a", "b")
                await live(r2, "a", "b")
                ids = [f"two-{i}" for i in range(40)]
                await submit_all(bus, [chain(i, n_steps=3) for i in ids])
                ends = await ended_all(ev, ids)
        finally:
            await r2.bus.close()
        assert all(isinstance(e, ChainCompleted) for e in ends.values())
        steps = [
            e
            for e in await stream_events(bus.js, "cy.events.t.*.step.completed")
            if isinstance(e, StepCompleted)
        ]
        assert Counter((e.chain_id, e.step_id) for e in steps) == Counter(
            {(i, f"s{k}"): 1 for i in ids for k in range(3)}
        )
        assert sb["a"].state.calls + sb["b"].state.calls == 120


def _router_proc(url: str, cfg_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "chainyard.cli", "router", "--nats", url, "--config", str(cfg_path)],
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _toml(cfg: Config) -> str:
    lines = [f'strategy = "{cfg.strategy}"']
    for d in cfg.deployments:
        assert d.price is not None
        lines += [
            "[[deployments]]",
            f'name = "{d.name}"',
            f'pool = "{d.pool}"',
            f'model = "{d.model}"',
            f"price = {{ input_per_mtok = {d.price.input_per_mtok}, "
            f"output_per_mtok = {d.price.output_per_mtok} }}",
        ]
    lines += ["[groups]", "g = [" + ", ".join(f'"{d.name}"' for d in cfg.deployments) + "]"]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(120)
async def test_killed_router_loses_and_duplicates_nothing(
    nats_server: NatsServer, bus: Bus, tmp_path: Path
) -> None:
    async with sandboxes("a", "b") as sb:
        for s in sb.values():
            await s.configure(latency_ms=30)
        cfg = config({n: s.url for n, s in sb.items()})
        path = tmp_path / "router.toml"
        path.write_text(_toml(cfg))
        procs: list[subprocess.Popen[bytes]] = []
        try:
            async with Events(bus.nc, "cy.events.t.>") as ev, running(*workers(bus, cfg)):
                procs.append(_router_proc(nats_server.url, path))
                ids = [f"kill-{i}" for i in range(60)]
                await submit_all(bus, [chain(i, n_steps=2) for i in ids])
                await ev.wait(lambda e: isinstance(e, ChainCompleted), 30, count=10)
                os.killpg(procs[0].pid, signal.SIGKILL)
                procs[0].wait(10)
                procs.append(_router_proc(nats_server.url, path))
                ends = await ended_all(ev, ids, within=90)
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        assert all(isinstance(e, ChainCompleted) for e in ends.values()), [
            e.reason for e in ends.values() if isinstance(e, ChainFailed)
        ]
        # A live subscriber can see an event a moment before the stream stores it: read the
        # stream once it holds what the subscriber saw.
        completed = await stored_events(bus.js, "cy.events.t.*.chain.completed", len(ids))
        assert Counter(e.chain_id for e in completed) == Counter({i: 1 for i in ids})
        steps = [
            e
            for e in await stored_events(bus.js, "cy.events.t.*.step.completed", 2 * len(ids))
            if isinstance(e, StepCompleted)
        ]
        assert Counter((e.chain_id, e.step_id) for e in steps) == Counter(
            {(i, f"s{k}"): 1 for i in ids for k in range(2)}
        )
        assert sb["a"].state.calls + sb["b"].state.calls == 120  # every step called exactly once
