"""Routing policy: which deployment gets a step.

Checks first (no I/O, all from local views): the model or group, route constraints
(avoid, capabilities), context window (input estimated at 4 characters a token, plus
max_tokens), per-step max cost, the chain's remaining budget, the circuit breaker and any
Retry-After cool-down, live workers (a fresh heartbeat), the provider's throttling, and the
predicted latency against the deadline. Among what is left: the `prefer`red ones if any, those
in the router's region unless cost or capacity says otherwise (`near_first`), the ones with free
slots if any, then the strategy's best score (strategies.py).

Two implementations of one decision. `_choose_slow` is the reference: it checks candidate by
candidate and says why when nothing is eligible. `choose` is what runs: it reads the cached
candidates and their live snapshot (candidates.py) and only does per-step arithmetic (cost,
budget, deadline, free slots, scores) over flat lists; when nothing is eligible it asks the
reference for the reason. The tests check the two agree.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from chainyard.contracts import Config, Deployment, LlmStep, Step, Target, now_ms

from .breakers import Breakers
from .candidates import Candidates
from .capacity import CapacityView
from .catalog import Catalog, target_of, tool_target
from .prices import unit_prices
from .strategies import Eligible, best, best_index, near_first

CHARS_PER_TOKEN = 4.0
Choice = tuple[Deployment, float]  # (deployment, estimated cost to reserve)


class NoCapacity(str):
    """A reason that may clear by itself (breaker, no live workers, throttling): the step waits."""

    __slots__ = ()


def estimate_input_tokens(step: LlmStep) -> int:
    msgs = step.messages
    chars = sum([len(m.content) for m in msgs])
    if step.tools:
        chars += sum([len(t.name) + len(t.description) + 64 for t in step.tools])
    return int(chars / CHARS_PER_TOKEN) + 4 * len(msgs) + 8


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


def far_deployments(config: Config) -> frozenset[str]:
    """The deployments whose pool is in another region than the router's (`[router] region`).
    A router or a pool without a region is near everything."""
    here = config.router.region
    if here is None:
        return frozenset()
    regions = {p.name: p.region for p in config.pools}
    return frozenset(
        d.name for d in config.deployments if (r := regions.get(d.pool)) is not None and r != here
    )


def _take(sel: list[int], *columns: list) -> tuple[list, ...]:
    """The rows `sel` of parallel lists."""
    return tuple([col[i] for i in sel] for col in columns)


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
        self._far = far_deployments(self.config)
        self._margin = self.config.router.cross_region_margin
        self._candidates = Candidates(catalog, capacity, breakers, self.price)

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
        """The same decision as `_choose_slow`, from the cached group and its live snapshot.

        Parallel lists, narrowed check by check: C candidates, L predicted latencies, P their
        pools' indices in the snapshot, K estimated costs; F free slots per snapshot pool.
        """
        cache = self._candidates
        if self.catalog is not cache.catalog:  # a new config: start over
            cache.reset(self.catalog)
            self._prices = {d.name: unit_prices(d) for d in self.catalog.config.deployments}
        route, brk = step.route, self.breakers
        key = (step.model, tuple(route.avoid), tuple(route.capabilities))
        g = cache.groups.get(key)
        if g is None:
            g = cache.add(step, key)
        if not g.cands:
            return f"no deployment serves model {step.model!r} within the step's route constraints"
        t = ctx.now_ms or now_ms()
        if (  # the snapshot holds while what it was built from holds
            g.version != self.capacity.version
            or not g.lo <= t < g.hi
            or g.brk_ver != cache.breaker_changes
            or (brk is not None and g.brk_len != len(brk.local))  # a deleted key: no on_change
        ):
            cache.refresh(g, t)
        C, L, P = g.alive, g.lats, g.pidx
        if not C:
            return self._choose_slow(step, exclude, ctx)
        inp = estimate_input_tokens(step)
        mt = step.params.max_tokens
        outp, window = mt or self.config.default_max_tokens, inp + (mt or 0)  # as in `need`
        # Tried deployments, context windows, half-open breakers' probes left: per step.
        xp, mc = ctx.exclude_pools, ctx.min_context
        if g.probes or exclude or xp or window > g.min_window or mc > g.min_window:
            sel = [
                i
                for i, c in enumerate(C)
                if c.name not in exclude
                and c.pool not in xp
                and window <= c.window
                and c.window >= mc
                and (i not in g.probes or brk.allows(c.name, t))  # type: ignore[union-attr]
            ]
            if len(sel) < len(C):
                if not sel:
                    return self._choose_slow(step, exclude, ctx)
                C, L, P = _take(sel, C, L, P)
        plan = None
        if C is g.alive:  # the whole snapshot: its costs for this need are cached
            plan = g.plans.get((inp, outp))
            if plan is None:
                plan = g.add_plan(inp, outp)
        K = plan.costs if plan is not None else [inp * c.pin + outp * c.pout for c in C]
        max_cost, left = route.max_cost_usd, ctx.left_usd
        if max_cost is not None or left is not None:  # the step's cap, the chain's budget
            most_usd = min(
                math.inf if max_cost is None else max_cost,
                math.inf if left is None else left + 1e-12,
            )
            if (plan.top if plan is not None else max(K)) > most_usd:
                sel = [i for i, k in enumerate(K) if not k > most_usd]
                if not sel:
                    return self._choose_slow(step, exclude, ctx)
                C, L, P, K = _take(sel, C, L, P, K)
        # Free slots per pool: what we sent since the heartbeat is partly in the polled backlog.
        sent, ploads = self.capacity._sent, g.ploads
        F = [ld.slots_free - (n if (n := sent[p]) > ld.pending else ld.pending) for p, ld in ploads]
        room_everywhere = min(F) > 0
        stretched = False
        if not room_everywhere and min(F) < 0:  # queued behind a full pool: rounds of calls
            L2: list[float | None] = []
            for lat, pi in zip(L, P, strict=True):
                if lat is not None and F[pi] < 0:
                    total = ploads[pi][1].slots_total or 1
                    lat *= (total - F[pi]) / total
                    stretched = True
                L2.append(lat)
            if stretched:
                L = L2
        dl = ctx.deadline_at_ms
        if dl is not None:
            slowest = max((x for x in L if x is not None), default=None) if stretched else g.max_lat
            if slowest is not None and t + slowest > dl:
                sel = [i for i, x in enumerate(L) if x is None or not t + x > dl]
                if len(sel) < len(C):
                    if not sel:
                        return self._choose_slow(step, exclude, ctx)
                    C, L, P, K = _take(sel, C, L, P, K)
        if route.prefer:  # the preferred ones if any is eligible
            pref = set(route.prefer)
            sel = [i for i, c in enumerate(C) if c.pool in pref or c.name in pref]
            if sel and len(sel) < len(C):
                C, L, P, K = _take(sel, C, L, P, K)
        if self._far and len(C) > 1:  # the router's own region first (near_first)
            far = self._far
            got = near_first([c.name in far for c in C], K, [F[pi] for pi in P], self._margin)
            if got is not None:
                C, L, P, K = _take(got, C, L, P, K)
        if len(C) > 1 and not room_everywhere:  # the ones with free slots if any
            sel = [i for i, pi in enumerate(P) if F[pi] > 0]
            if sel and len(sel) < len(C):
                C, L, P, K = _take(sel, C, L, P, K)
        i = 0
        if len(C) > 1:
            # Every narrowing above makes new lists: the same ones mean the whole snapshot.
            whole = plan if C is g.alive and L is g.lats else None
            strategy = route.strategy or self.config.strategy
            i = best_index(self.rng, g, C, K, L, P, F, strategy, whole)
        chosen = C[i]
        sent[chosen.pool] += 1
        if brk is not None:
            brk.note_dispatch(chosen.name)
        return chosen.d, K[i]

    def _choose_slow(self, step: LlmStep, exclude: list[str], ctx: Ctx) -> Choice | str:
        """The reference decision, candidate by candidate; also says why nothing is eligible."""
        candidates = self.catalog.deployments(step)
        if not candidates:
            return f"no deployment serves model {step.model!r} within the step's route constraints"
        t = ctx.now_ms or now_ms()
        need = self.need(step)
        cap, brk = self.capacity, self.breakers
        max_cost = step.route.max_cost_usd
        left = ctx.left_usd
        why: dict[str, list[str]] = {}
        ok: list[Eligible] = []
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
        if self._far and len(ok) > 1:
            far = self._far
            got = near_first(
                [c[0].name in far for c in ok], [c[1] for c in ok], [c[3] for c in ok], self._margin
            )
            ok = ok if got is None else [ok[i] for i in got]
        if len(ok) > 1:
            with_room = [c for c in ok if c[3] > 0]
            ok = with_room or ok
        strategy = step.route.strategy or self.config.strategy
        best_ok = best(ok, strategy, self.rng) if len(ok) > 1 else ok[0]
        cap._sent[best_ok[0].pool] += 1
        if brk is not None:
            brk.note_dispatch(best_ok[0].name)
        return best_ok[0], best_ok[1]

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
