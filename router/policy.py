"""Routing policy: which deployment gets a step.

Checks first (no I/O, all from local views): the model or group, route constraints
(avoid, capabilities), context window (input estimated at 4 characters a token, plus
max_tokens), per-step max cost, the chain's remaining budget, the circuit breaker and any
Retry-After cool-down, live workers (a fresh heartbeat), the provider's throttling, and the
predicted latency against the deadline. Among what is left: the `prefer`red ones if any, the
ones with free slots if any, then the strategy's best score; near-ties go to the less loaded of
two random choices.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from chainyard.contracts import Config, Deployment, LlmStep, Step, Target

from .breakers import Breakers
from .capacity import CapacityView
from .catalog import Catalog, target_of, tool_target
from .prices import unit_prices

CHARS_PER_TOKEN = 4.0
TIE = 0.02  # scores within 2% of the best are a tie
Choice = tuple[Deployment, float]  # (deployment, estimated cost to reserve)


class NoCapacity(str):
    """A reason that may clear by itself (breaker, no live workers, throttling): the step waits."""

    __slots__ = ()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def estimate_input_tokens(step: LlmStep) -> int:
    chars = sum(len(m.content) for m in step.messages)
    chars += sum(len(t.name) + len(t.description) + 64 for t in step.tools)
    return int(chars / CHARS_PER_TOKEN) + 4 * len(step.messages) + 8


@dataclass(slots=True)
class Need:
    """What one step needs, computed once per pick."""

    input_tokens: int
    output_tokens: int  # max_tokens, or the config's default for the reservation
    window: int  # input + max_tokens when given


@dataclass(slots=True)
class Ctx:
    left_usd: float | None = None
    deadline_at_ms: int | None = None
    now_ms: int = 0
    min_context: int = 0
    exclude_pools: frozenset[str] = field(default_factory=frozenset)


class Policy:
    def __init__(
        self,
        catalog: Catalog,
        capacity: CapacityView,
        config: Config | None = None,
        breakers: Breakers | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.capacity = capacity
        self.config = config or catalog.config
        self.breakers = breakers
        self.rng = rng or random.Random()
        self._prices = {d.name: unit_prices(d) for d in self.config.deployments}

    def price(self, d: Deployment) -> tuple[float, float]:
        p = self._prices.get(d.name)
        if p is None:
            p = self._prices[d.name] = unit_prices(d)
        return p

    def need(self, step: LlmStep) -> Need:
        inp = estimate_input_tokens(step)
        mt = step.params.max_tokens
        return Need(inp, mt or self.config.default_max_tokens, inp + (mt or 0))

    def estimate(self, d: Deployment, need: Need) -> float:
        pin, pout = self.price(d)
        return need.input_tokens * pin + need.output_tokens * pout

    def pick(self, step: Step, exclude: list[str]) -> Target | str:
        """Without a budget or deadline: for callers that only need a target."""
        if not isinstance(step, LlmStep):
            return tool_target(step.tool)
        got = self.choose(step, exclude, Ctx(now_ms=now_ms()))
        return got if isinstance(got, str) else target_of(got[0])

    def choose(self, step: LlmStep, exclude: list[str], ctx: Ctx) -> Choice | str:
        candidates = self.catalog.deployments(step)
        if not candidates:
            return f"no deployment serves model {step.model!r} within the step's route constraints"
        t = ctx.now_ms or now_ms()
        need = self.need(step)
        cap, brk = self.capacity, self.breakers
        max_cost = step.route.max_cost_usd
        left = ctx.left_usd
        why: dict[str, list[str]] = {}
        # (deployment, cost, predicted latency or None, free slots, load)
        ok: list[tuple[Deployment, float, float | None, int, float]] = []
        for d in candidates:
            if d.name in exclude or d.pool in ctx.exclude_pools:
                why.setdefault("tried", []).append(d.name)
                continue
            if need.window > d.context_window or d.context_window < ctx.min_context:
                why.setdefault("context", []).append(d.name)
                continue
            pin, pout = self._prices.get(d.name) or self.price(d)
            cost = need.input_tokens * pin + need.output_tokens * pout
            if max_cost is not None and cost > max_cost:
                why.setdefault("max_cost", []).append(f"{d.name} ~${cost:.6f}")
                continue
            if left is not None and cost > left + 1e-12:
                why.setdefault("budget", []).append(f"{d.name} ~${cost:.6f}")
                continue
            if brk is not None and not brk.allows(d.name, t):
                why.setdefault("capacity", []).append(f"{d.name}: breaker open or cooling down")
                continue
            load = cap.pools.get(d.pool)
            if load is None or t > load.live_until_ms:
                why.setdefault("capacity", []).append(f"{d.name}: no live workers in pool {d.pool}")
                continue
            stats = cap.stats.get(d.name)
            if stats is not None and stats.throttled_until_ms > t:
                why.setdefault("capacity", []).append(f"{d.name}: throttled by the provider")
                continue
            # what we sent since the heartbeat is partly in the polled backlog: count it once
            free = load.slots_free - max(cap._sent[d.pool], load.pending)
            total = load.slots_total or 1
            busy = total - free
            lat = (
                stats.latency_ms
                if stats is not None and stats.latency_ms is not None
                else d.expected_latency_ms
            )
            if lat is not None and busy > total:  # queued behind a full pool: rounds of calls
                lat *= busy / total
            if lat is not None and ctx.deadline_at_ms is not None and t + lat > ctx.deadline_at_ms:
                why.setdefault("deadline", []).append(f"{d.name} ~{lat:.0f} ms")
                continue
            ok.append((d, cost, lat, free, busy / total))
        if not ok:
            return self._reason(step, why, left)
        if step.route.prefer:
            pref = set(step.route.prefer)
            preferred = [c for c in ok if c[0].pool in pref or c[0].name in pref]
            ok = preferred or ok
        if len(ok) > 1:
            with_room = [c for c in ok if c[3] > 0]
            ok = with_room or ok
        best = self._best(ok, step.route.strategy or self.config.strategy) if len(ok) > 1 else ok[0]
        cap._sent[best[0].pool] += 1
        if brk is not None:
            brk.note_dispatch(best[0].name)
        return best[0], best[1]

    def _best(
        self, ok: list[tuple[Deployment, float, float | None, int, float]], strategy: str
    ) -> tuple[Deployment, float, float | None, int, float]:
        rng = self.rng
        if strategy == "weighted":
            weights = [max(c[0].weight, 0.0) for c in ok]
            if sum(weights) > 0:
                return rng.choices(ok, weights)[0]
            strategy = "balanced"
        known = [c[2] for c in ok if c[2] is not None]
        # An unmeasured deployment counts as fast as the fastest measured one, so it gets tried.
        unknown = min(known) if known else 0.0
        if strategy == "cheapest":
            scores = [c[1] for c in ok]
        elif strategy == "fastest":
            scores = [c[2] if c[2] is not None else unknown for c in ok]
        else:  # balanced: cost and predicted latency, each relative to the worst candidate
            top_cost = max(c[1] for c in ok) or 1.0
            top_lat = max(known) if known and max(known) > 0 else 1.0
            scores = [
                c[1] / top_cost + (c[2] if c[2] is not None else unknown) / top_lat for c in ok
            ]
        low = min(scores)
        ties = [c for c, s in zip(ok, scores, strict=True) if s <= low + abs(low) * TIE + 1e-12]
        if len(ties) == 1:
            return ties[0]
        a, b = rng.sample(ties, 2)  # power of two choices: the less loaded of two at random
        return a if a[4] <= b[4] else b

    def _reason(self, step: LlmStep, why: dict[str, list[str]], left: float | None) -> str:
        m = step.model
        if why.get("capacity"):
            return NoCapacity(f"no capacity for {m!r}: {'; '.join(why['capacity'])}")
        if why.get("budget"):
            cheapest = min(why["budget"], key=lambda s: float(s.rsplit("$", 1)[1]))
            name, cost = cheapest.split(" ~")
            return (
                f"over budget: step {step.id!r} needs at least {cost} (on {name}), "
                f"${left or 0:.6f} left"
            )
        if why.get("deadline"):
            late = ", ".join(why["deadline"])
            return f"deadline: no deployment of {m!r} can answer in time ({late})"
        if why.get("context"):
            tried = ", ".join(why["context"])
            return f"context window: no deployment of {m!r} fits the prompt ({tried})"
        if why.get("max_cost"):
            over = ", ".join(why["max_cost"])
            cap = step.route.max_cost_usd
            return f"max cost: every deployment of {m!r} costs over ${cap} ({over})"
        return f"no deployment of {m!r} left to try (tried {', '.join(why.get('tried', []))})"


class Picker:
    """A pick function for one transition: carries the chain's remaining budget and deadline and
    records what each pick reserved, so the transition can store it in the same CAS."""

    def __init__(
        self,
        policy: Policy,
        *,
        left_usd: float | None,
        deadline_at_ms: int | None,
        now: int,
        min_context: int = 0,
    ) -> None:
        self.policy = policy
        self.ctx = Ctx(
            left_usd=left_usd, deadline_at_ms=deadline_at_ms, now_ms=now, min_context=min_context
        )
        self.reserved: dict[str, float] = {}
        self.waiting: dict[str, str] = {}  # step id -> why it waits for capacity

    def __call__(self, step: Step, exclude: list[str]) -> Target | str:
        if not isinstance(step, LlmStep):
            return tool_target(step.tool)
        got = self.policy.choose(step, exclude, self.ctx)
        if isinstance(got, str):
            if isinstance(got, NoCapacity):
                self.waiting[step.id] = got
            return got
        d, cost = got
        if self.ctx.left_usd is not None:
            self.ctx.left_usd -= cost
        self.reserved[step.id] = cost
        self.ctx.min_context = 0  # only the failed-over step needed a bigger window
        return target_of(d)
