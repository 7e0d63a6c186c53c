"""Fast unit tests of the routing policy, breakers, budgets and hedges: no NATS, no I/O."""

from __future__ import annotations

import random
from typing import Any

import msgspec

from chainyard.contracts import (
    Chain,
    ChainState,
    Config,
    Deployment,
    ErrorInfo,
    LlmStep,
    Message,
    Output,
    Params,
    Price,
    Route,
    StepCompleted,
    StepFailed,
    StepState,
    Target,
)
from chainyard.router import budget, chains, hedge
from chainyard.router.breakers import CLOSED, Breaker, next_state
from chainyard.router.capacity import CapacityView, DeploymentStats, PoolLoad
from chainyard.router.catalog import Catalog
from chainyard.router.fairness import Fairness
from chainyard.router.policy import Ctx, NoCapacity, Picker, Policy, estimate_input_tokens

T = 1_000_000


def dep(name: str, inp: float, out: float, **kw: Any) -> Deployment:
    return Deployment(
        name=name,
        pool=kw.pop("pool", name),
        model=name,
        price=Price(input_per_mtok=inp, output_per_mtok=out),
        **kw,
    )


def setup(
    deps: list[Deployment], *, strategy: str = "balanced", live: bool = True, **cfg: Any
) -> tuple[Policy, CapacityView]:
    config = Config(
        deployments=deps, groups={"g": [d.name for d in deps]}, strategy=strategy, **cfg
    )  # type: ignore[arg-type]
    cap = CapacityView(None)  # type: ignore[arg-type]
    for d in deps:
        cap._seen_pools.add(d.pool)
        cap.pools[d.pool] = PoolLoad(
            live_until_ms=T + 10_000 if live else 0, slots_total=1000, slots_free=1000
        )
    policy = Policy(Catalog(config, cap.seen), cap, config, None, random.Random(1))
    return policy, cap


def step(
    text: str = "hello there", model: str = "g", max_tokens: int | None = 10, **route: Any
) -> LlmStep:
    return LlmStep(
        id="s",
        model=model,
        messages=[Message(role="user", content=text)],
        params=Params(max_tokens=max_tokens),
        route=Route(**route),
    )


def pick(policy: Policy, s: LlmStep, exclude: list[str] | None = None, **ctx: Any) -> str:
    got = policy.choose(s, exclude or [], Ctx(now_ms=T, **ctx))
    return got if isinstance(got, str) else got[0].name


def test_cheapest_picks_the_cheapest_with_room() -> None:
    policy, cap = setup([dep("dear", 5, 15), dep("cheap", 0.1, 0.4)], strategy="cheapest")
    assert pick(policy, step()) == "cheap"
    cap.pools["cheap"].slots_free = 0  # full: the one with room wins
    assert pick(policy, step()) == "dear"


def test_fastest_uses_heartbeat_latency_and_avoids_the_slow() -> None:
    policy, cap = setup([dep("a", 1, 1), dep("b", 1, 1)], strategy="fastest")
    cap.stats["a"] = DeploymentStats(latency_ms=900.0, calls=10)
    cap.stats["b"] = DeploymentStats(latency_ms=40.0, calls=10)
    assert {pick(policy, step()) for _ in range(20)} == {"b"}


def test_balanced_trades_cost_against_latency() -> None:
    policy, cap = setup([dep("cheap-slow", 0.1, 0.1), dep("dear-fast", 10, 10)])
    cap.stats["cheap-slow"] = DeploymentStats(latency_ms=100.0, calls=5)
    cap.stats["dear-fast"] = DeploymentStats(latency_ms=90.0, calls=5)
    assert pick(policy, step()) == "cheap-slow"  # 10 % slower, 100x cheaper
    cap.stats["cheap-slow"] = DeploymentStats(latency_ms=5000.0, calls=5)
    assert pick(policy, step()) == "dear-fast"


def test_ties_go_to_the_less_loaded() -> None:
    policy, cap = setup([dep("a", 1, 1), dep("b", 1, 1)], strategy="cheapest")
    cap.pools["a"].slots_free = 1
    assert {pick(policy, step()) for _ in range(20)} == {"b"}


def test_weighted_follows_weights() -> None:
    policy, _ = setup([dep("a", 1, 1, weight=9.0), dep("b", 1, 1, weight=1.0)], strategy="weighted")
    got = [pick(policy, step()) for _ in range(500)]
    assert 0.8 < got.count("a") / len(got) < 0.97


def test_context_window_and_capabilities_filter_first() -> None:
    small = dep("small", 0.1, 0.1, context_window=50)
    big = dep("big", 5, 5, context_window=100_000, capabilities=["json"])
    policy, _ = setup([small, big], strategy="cheapest")
    assert pick(policy, step("word " * 100)) == "big"  # ~125 tokens do not fit in 50
    assert pick(policy, step(capabilities=["json"])) == "big"
    assert pick(policy, step(), min_context=51) == "big"  # a context_window failover
    assert estimate_input_tokens(step("x" * 400)) >= 100


def test_budget_picks_cheaper_then_says_over_budget() -> None:
    policy, _ = setup([dep("dear", 1000, 1000), dep("cheap", 1, 1)], strategy="fastest")
    s = step(prefer=["dear"])
    assert pick(policy, s) == "dear"
    assert pick(policy, s, left_usd=0.001) == "cheap"  # dear needs ~0.02
    why = pick(policy, s, left_usd=1e-9)
    assert why.startswith("over budget") and not isinstance(why, NoCapacity)


def test_no_capacity_is_a_reason_to_wait() -> None:
    policy, _ = setup([dep("a", 1, 1)], live=False)
    why = pick(policy, step())
    assert isinstance(why, NoCapacity) and "no live workers" in why
    assert pick(policy, step(model="nope")).startswith("no deployment serves")
    assert "left to try" in pick(setup([dep("a", 1, 1)])[0], step(), ["a"])


def test_deadline_excludes_the_predicted_late() -> None:
    policy, cap = setup([dep("slow", 0.1, 0.1), dep("fast", 9, 9)], strategy="cheapest")
    cap.stats["slow"] = DeploymentStats(latency_ms=5000.0, calls=3)
    assert pick(policy, step(), deadline_at_ms=T + 1000) == "fast"
    cap.stats["fast"] = DeploymentStats(latency_ms=3000.0, calls=3)
    assert pick(policy, step(), deadline_at_ms=T + 1000).startswith("deadline")


def test_picker_reserves_across_a_fan_out() -> None:
    policy, _ = setup([dep("a", 1000, 1000)])
    picker = Picker(policy, left_usd=0.05, deadline_at_ms=None, now=T)
    got = [picker(step(), []) for _ in range(5)]
    placed = [g for g in got if isinstance(g, Target)]
    assert 1 <= len(placed) < 5 and picker.ctx.left_usd is not None and picker.ctx.left_usd >= 0


# -- breakers ---------------------------------------------------------------------------------

TGT = Target(deployment="a", pool="a", provider="openai", model="a")


def failed(status: int = 503, retry_after: float | None = None, attempt: int = 1) -> StepFailed:
    return StepFailed(
        chain_id="c",
        step_id="s",
        attempt=attempt,
        tenant="t",
        target=TGT,
        worker="w",
        error=ErrorInfo(cls="retryable", message="boom", status=status, retry_after_s=retry_after),
    )


def completed(attempt: int = 1, target: Target = TGT, cost: float = 0.01) -> StepCompleted:
    return StepCompleted(
        chain_id="c",
        step_id="s",
        attempt=attempt,
        tenant="t",
        output=Output(text="ok"),
        target=target,
        worker="w",
        dispatched_at_ms=T,
        started_at_ms=T,
        latency_ms=1.0,
        cost_usd=cost,
    )


def test_breaker_opens_cools_probes_and_closes() -> None:
    cfg = Config(breaker_failures=3, breaker_cooldown_s=1.0)
    b: Breaker = CLOSED
    for i in range(3):  # three calls (three attempts) failed
        b = next_state(b, failed(attempt=i + 1), cfg, T + i) or b
    assert b.status == "open" and b.open_until_ms == T + 2 + 1000
    assert next_state(b, failed(attempt=3), cfg, T + 3) is None  # the same result again
    again = next_state(
        b, failed(attempt=4), cfg, b.open_until_ms + 1
    )  # a failed probe: longer cooldown
    assert again is not None and again.status == "open" and again.cooldown_s == 2.0
    closed = next_state(again, completed(), cfg, again.open_until_ms + 1)
    assert closed is not None and closed.status == "closed" and closed.failures == 0
    assert next_state(CLOSED, completed(), cfg, T) is None  # healthy: no KV write


def test_429_storm_opens_and_retry_after_cools() -> None:
    cfg = Config(breaker_throttles=2, breaker_failures=10)
    b = next_state(CLOSED, failed(429, retry_after=3.0), cfg, T)
    assert b is not None and b.status == "closed" and b.cooled_until_ms == T + 3000
    b = next_state(b, failed(429, retry_after=3.0, attempt=2), cfg, T + 1)
    assert b is not None and b.status == "open" and "429" in b.reason


# -- budgets and hedges in state --------------------------------------------------------------


def state_with(**st: Any) -> ChainState:
    chain = Chain(id="c", steps=[step(hedge_after_ms=100)], budget_usd=1.0)
    return ChainState(
        chain=chain,
        tenant="t",
        created_at_ms=T,
        steps={"s": StepState(status="dispatched", attempt=1, target=TGT, **st)},
    )


def test_remaining_counts_costs_and_reservations() -> None:
    s = state_with(reserved_usd=0.3, hedge_reserved_usd=0.2)
    assert budget.remaining(s) == 0.5
    assert budget.remaining(s, release="s") == 1.0


def test_hedge_first_result_wins_and_loser_is_not_current() -> None:
    other = Target(deployment="b", pool="b", provider="openai", model="b")
    s = hedge.with_hedge(state_with(reserved_usd=0.3), "s", other, 0.2)
    assert hedge.live_attempts(s.steps["s"]) == (1, hedge.HEDGE_BASE + 1)
    assert hedge.is_current(s, "s", 101) and hedge.is_current(s, "s", 1)
    # The primary fails while the hedge runs: only marked dead.
    dropped = hedge.drop_attempt(s, failed(attempt=1))
    assert dropped is not None and hedge.live_attempts(dropped.steps["s"]) == (101,)
    assert not hedge.is_current(dropped, "s", 1)
    # The hedge completes: the step is settled once, reservations released.
    policy, _ = setup([dep("a", 1, 1), dep("b", 1, 1)])
    picker = Picker(policy, left_usd=1.0, deadline_at_ms=None, now=T)
    out = chains.on_completed(dropped, completed(101, other, 0.02), T, picker)
    sealed = budget.seal(dropped, out.state, picker)
    st = sealed.steps["s"]
    assert st.status == "completed" and st.cost_usd == 0.02 and st.reserved_usd == 0
    assert st.hedge_attempt == 0 and not hedge.is_current(sealed, "s", 1)
    assert sealed.cost_usd == 0.02


def test_fairness_defers_a_tenant_at_its_cap_but_never_drops() -> None:
    f = Fairness(cap=2)
    f.note("a", "c1.s")
    f.note("a", "c2.s")
    assert f.defer_s("a", 5, 1, 5) is not None
    assert f.defer_s("b", 5, 1, 5) is None  # other tenants go first
    assert f.defer_s("a", 9, 1, 5) is None  # high priority bypasses
    assert f.defer_s("a", 5, 5, 5) is None  # last delivery: accepted anyway
    f.done("a", "c1.s")
    assert f.defer_s("a", 5, 1, 5) is None


def test_state_round_trips_with_routing_fields() -> None:
    s = state_with(reserved_usd=0.1, hedge_attempt=101, hedge_target=TGT, dead=[1])
    assert msgspec.json.decode(msgspec.json.encode(s), type=ChainState) == s


# -- crash recovery: followups re-send routing timers -----------------------------------------


def test_followups_resend_hedge_and_capacity_timers_with_their_first_ids() -> None:
    from chainyard.router.routing import Routing, _timer

    def msg_id(tm: Any) -> str:  # as the engine's _schedule derives it
        return f"{tm.chain_id}.{tm.step_id}.{tm.attempt}.{tm.kind}"

    hedged = LlmStep(
        id="h",
        model="g",
        messages=[Message(role="user", content="hi")],
        route=Route(hedge_after_ms=300),
    )
    waiting = LlmStep(id="w", model="g", messages=[Message(role="user", content="hi")])
    chain = Chain(id="c", steps=[hedged, waiting])

    def pick(s: Any, exclude: list[str]) -> Any:
        return TGT if s.id == "h" else NoCapacity("no capacity for 'g': a: no live workers")

    out = chains.start(chain, "t", T, pick)
    st = out.state.steps
    assert st["h"].status == "dispatched" and st["w"].status == "pending"
    first_hedge = _timer(out.state, "h", "hedge", 1, T + 300)  # what Routing.finish schedules
    first = {msg_id(tm) for tm in out.timers} | {msg_id(first_hedge)}
    # the router died after recording the state: the redelivered message re-derives the effects
    again = chains.followups(out.state, T + 50)
    assert again.dispatch == ["h"]
    assert {msg_id(tm) for tm in again.timers} == first == {"c.h.1.hedge", "c.w.0.capacity"}
    assert next(tm for tm in again.timers if tm.kind == "hedge") == first_hedge
    # once the hedge is out, or the step has left the window, no hedge timer comes back
    with_h = hedge.with_hedge(out.state, "h", TGT, 0.0)
    assert [tm.kind for tm in chains.followups(with_h, T + 60).timers] == ["capacity"]
    late = chains.followups(out.state, T + chains.REDISPATCH_WINDOW_MS + 1)
    assert [tm.kind for tm in late.timers] == ["capacity"] and late.dispatch == []
    # a capacity timer redelivered after it placed its step re-sends the assignment
    placed = msgspec.structs.replace(
        out.state,
        steps={
            **st,
            "w": StepState(status="dispatched", attempt=1, target=TGT, dispatched_at_ms=T + 70),
        },
    )
    timer = next(tm for tm in out.timers if tm.kind == "capacity")
    redo = Routing._capacity_due(None, placed, timer, T + 80, T)  # type: ignore[arg-type]
    assert redo is not None and sorted(redo.dispatch) == ["h", "w"] and redo.state is placed
