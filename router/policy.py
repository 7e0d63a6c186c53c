"""Routing policy: which deployment gets a step.

Checks first (no I/O, all from local views): the model or group, route constraints
(avoid, capabilities), context window (input estimated at 4 characters a token, plus
max_tokens), per-step max cost, the chain's remaining budget, the circuit breaker and any
Retry-After cool-down, live workers (a fresh heartbeat), the provider's throttling, and the
predicted latency against the deadline. Among what is left: the `prefer`red ones if any, the
ones with free slots if any, then the strategy's best score; near-ties go to the less loaded of
two random choices.

The decision is cached in two layers (`_Group`): per (model or group, avoid, capabilities) what
never changes (candidates in catalog order, prices, context windows, weights), and a live
snapshot of who passes the breaker / heartbeat / throttling checks, with their latencies,
rebuilt only when the capacity view or a breaker changes, or the clock crosses a time at which
one of those checks flips. A pick then only does per-step arithmetic (cost, budget, deadline,
free slots, scores) over flat lists. `_choose_slow` is the reference implementation: it gives
the reason when nothing is eligible, and the tests check the two agree.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from itertools import accumulate

from chainyard.contracts import Config, Deployment, LlmStep, Step, Target

from .breakers import Breakers
from .capacity import CapacityView, PoolLoad
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


_NEVER = 1 << 62  # a time bound no clock reaches
_MAX_GROUPS = 1024  # route constraints come from users: bound the cache


class _Cand:
    """What never changes about one candidate deployment."""

    __slots__ = ("d", "name", "pin", "pool", "pout", "prior", "weight", "window")

    def __init__(self, d: Deployment, pin: float, pout: float) -> None:
        self.d, self.name, self.pool, self.window = d, d.name, d.pool, d.context_window
        self.pin, self.pout = pin, pout
        self.weight = max(d.weight, 0.0)
        self.prior = d.expected_latency_ms


_MAX_PLANS = 256  # per group snapshot


class _Plan:
    """For one (input tokens, output tokens) over a whole snapshot: the costs, their top, and
    per strategy the indices tied for the best score."""

    __slots__ = ("costs", "ties", "top")

    def __init__(self, costs: list[float]) -> None:
        self.costs = costs
        self.top = max(costs)
        self.ties: dict[str, list[int]] = {}


class _Group:
    """The candidates of one (model, avoid, capabilities), in catalog order, and their live
    snapshot: the ones passing the breaker, heartbeat and throttling checks (`alive`), with
    their latency (`lats`), the index of their pool in `ploads` (`pidx`), and what the scores
    need when nothing else filters (`fast`, `bal`). Valid while the capacity view's version and
    the breakers' change count hold and the clock stays in [lo, hi)."""

    __slots__ = (
        "alive",
        "bal",
        "brk_len",
        "brk_ver",
        "cands",
        "cum_weights",
        "fast",
        "hi",
        "lats",
        "lo",
        "max_lat",
        "min_window",
        "pidx",
        "plans",
        "ploads",
        "probes",
        "version",
        "weights_sum",
    )  # fmt: skip

    def __init__(self, cands: list[_Cand]) -> None:
        self.cands = cands
        self.version = -1  # no snapshot yet
        self.brk_ver = self.brk_len = -1
        self.lo = self.hi = 0
        self.alive: list[_Cand] = []
        self.lats: list[float | None] = []
        self.pidx: list[int] = []
        self.ploads: list[tuple[str, PoolLoad]] = []
        self.probes: set[int] = set()  # alive indices whose breaker is half-open
        self.min_window = 0
        self.max_lat: float | None = None
        self.fast: list[float] = []
        self.bal: list[float] = []
        self.cum_weights: list[float] = []
        self.weights_sum = 0.0
        self.plans: dict[tuple[int, int], _Plan] = {}


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
        self._groups: dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Group] = {}
        self._groups_of: Catalog = catalog  # the catalog the groups were built from
        self._brk_ver = 0  # breaker changes seen (their on_change hook)
        if breakers is not None:
            before = breakers.on_change

            def changed() -> None:
                self._brk_ver += 1
                if before is not None:
                    before()

            breakers.on_change = changed

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
        """The same decision as `_choose_slow`, from the cached group and live snapshot."""
        route = step.route
        if self.catalog is not self._groups_of:  # a new config: start over
            self._groups, self._groups_of = {}, self.catalog
            self._prices = {d.name: unit_prices(d) for d in self.catalog.config.deployments}
        key = (step.model, tuple(route.avoid), tuple(route.capabilities))
        g = self._groups.get(key)
        if g is None:
            g = self._group(step, key)
        if not g.cands:
            return f"no deployment serves model {step.model!r} within the step's route constraints"
        t = ctx.now_ms or now_ms()
        cap, brk = self.capacity, self.breakers
        if (
            g.version != cap.version
            or not g.lo <= t < g.hi
            or g.brk_ver != self._brk_ver
            or (brk is not None and g.brk_len != len(brk.local))
        ):
            self._refresh(g, t)
        C, L, P = g.alive, g.lats, g.pidx
        if not C:
            return self._choose_slow(step, exclude, ctx)
        inp = estimate_input_tokens(step)
        mt = step.params.max_tokens
        outp, window = mt or self.config.default_max_tokens, inp + (mt or 0)  # as in `need`
        mc = ctx.min_context
        pristine = True  # C, L, P are the whole snapshot, latencies not stretched
        if g.probes or exclude or ctx.exclude_pools or window > g.min_window or mc > g.min_window:
            xp, w, probes = ctx.exclude_pools, window, g.probes
            sel = [
                i
                for i, c in enumerate(C)
                if c.name not in exclude
                and c.pool not in xp
                and w <= c.window
                and c.window >= mc
                and (i not in probes or brk.allows(c.name, t))  # type: ignore[union-attr]
            ]
            if len(sel) < len(C):
                if not sel:
                    return self._choose_slow(step, exclude, ctx)
                C, L, P, pristine = (
                    [C[i] for i in sel],
                    [L[i] for i in sel],
                    [P[i] for i in sel],
                    False,
                )
        plan = None
        if pristine:  # the costs of the whole snapshot for this need, computed once
            plan = g.plans.get((inp, outp))
            if plan is None:
                if len(g.plans) >= _MAX_PLANS:
                    g.plans.clear()
                plan = g.plans[inp, outp] = _Plan([inp * c.pin + outp * c.pout for c in C])
            K = plan.costs
        else:
            K = [inp * c.pin + outp * c.pout for c in C]
        max_cost, left = route.max_cost_usd, ctx.left_usd
        if max_cost is not None or left is not None:
            top = plan.top if plan is not None else max(K)
            if (max_cost is not None and top > max_cost) or (
                left is not None and top > left + 1e-12
            ):
                sel = [
                    i
                    for i, k in enumerate(K)
                    if not (max_cost is not None and k > max_cost)
                    and not (left is not None and k > left + 1e-12)
                ]
                if not sel:
                    return self._choose_slow(step, exclude, ctx)
                C, L, P, K = (
                    [C[i] for i in sel],
                    [L[i] for i in sel],
                    [P[i] for i in sel],
                    [K[i] for i in sel],
                )
                pristine = False
        # free slots per pool: what we sent since the heartbeat is partly in the polled backlog
        sent, ploads = cap._sent, g.ploads
        F = [ld.slots_free - (n if (n := sent[p]) > ld.pending else ld.pending) for p, ld in ploads]
        room_everywhere = min(F) > 0
        stretched = False
        if not room_everywhere and any(f < 0 for f in F):  # queued behind a full pool
            L2: list[float | None] = []
            for lat, pi in zip(L, P, strict=True):
                if lat is not None and F[pi] < 0:
                    total = ploads[pi][1].slots_total or 1
                    lat *= (total - F[pi]) / total
                    stretched = True
                L2.append(lat)
            if stretched:
                L, pristine = L2, False
        dl = ctx.deadline_at_ms
        if dl is not None:
            known = (
                g.max_lat if not stretched else max((x for x in L if x is not None), default=None)
            )
            if known is not None and t + known > dl:
                sel = [i for i, x in enumerate(L) if x is None or not t + x > dl]
                if len(sel) < len(C):
                    if not sel:
                        return self._choose_slow(step, exclude, ctx)
                    C, L, P, K = (
                        [C[i] for i in sel],
                        [L[i] for i in sel],
                        [P[i] for i in sel],
                        [K[i] for i in sel],
                    )
                    pristine = False
        if route.prefer:
            pref = set(route.prefer)
            sel = [i for i, c in enumerate(C) if c.pool in pref or c.name in pref]
            if sel and len(sel) < len(C):
                C, L, P, K = (
                    [C[i] for i in sel],
                    [L[i] for i in sel],
                    [P[i] for i in sel],
                    [K[i] for i in sel],
                )
                pristine = False
        if len(C) > 1 and not room_everywhere:
            sel = [i for i, pi in enumerate(P) if F[pi] > 0]
            if sel and len(sel) < len(C):
                C, L, P, K = (
                    [C[i] for i in sel],
                    [L[i] for i in sel],
                    [P[i] for i in sel],
                    [K[i] for i in sel],
                )
                pristine = False
        i = 0
        if len(C) > 1:
            strategy = route.strategy or self.config.strategy
            i = self._best_idx(g, C, K, L, P, F, strategy, plan if pristine else None)
        best = C[i]
        sent[best.pool] += 1
        if brk is not None:
            brk.note_dispatch(best.name)
        return best.d, K[i]

    def _group(self, step: LlmStep, key: tuple[str, tuple[str, ...], tuple[str, ...]]) -> _Group:
        if len(self._groups) >= _MAX_GROUPS:
            self._groups.clear()
        g = self._groups[key] = _Group(
            [_Cand(d, *self.price(d)) for d in self.catalog.deployments(step)]
        )
        return g

    def _refresh(self, g: _Group, t: int) -> None:
        """Rebuild the live snapshot: who passes the checks that do not depend on the step."""
        cap, brk = self.capacity, self.breakers
        pools, stats = cap.pools, cap.stats
        local = brk.local if brk is not None else None
        lo, hi = -_NEVER, _NEVER
        alive: list[_Cand] = []
        lats: list[float | None] = []
        pidx: list[int] = []
        ploads: list[tuple[str, PoolLoad]] = []
        where: dict[str, int] = {}
        probes: set[int] = set()
        for c in g.cands:
            start, probe = 0, False  # alive while start <= t <= end
            if local is not None and (b := local.get(c.name)) is not None:
                if b.status == "closed":
                    start = b.cooled_until_ms
                else:  # open, then half-open: probes are counted per dispatch
                    start, probe = max(b.open_until_ms, b.cooled_until_ms), True
            st = stats.get(c.name)
            if st is not None and st.throttled_until_ms > start:
                start = st.throttled_until_ms
            load = pools.get(c.pool)
            if load is None:
                continue  # appears with a capacity change
            end = load.live_until_ms
            if t < start:
                if start < hi:
                    hi = start
                continue
            if t > end:
                if end >= lo:
                    lo = end + 1
                continue
            if start > lo:
                lo = start
            if end < hi:
                hi = end + 1
            if probe:
                probes.add(len(alive))
            alive.append(c)
            lats.append(c.prior if st is None or st.latency_ms is None else st.latency_ms)
            pi = where.get(c.pool)
            if pi is None:
                pi = where[c.pool] = len(ploads)
                ploads.append((c.pool, load))
            pidx.append(pi)
        known = [x for x in lats if x is not None]
        unknown = min(known) if known else 0.0
        top_lat = max(known) if known and max(known) > 0 else 1.0
        g.alive, g.lats, g.pidx, g.ploads, g.probes = alive, lats, pidx, ploads, probes
        g.min_window = min((c.window for c in alive), default=0)
        g.max_lat = max(known) if known else None
        g.fast = [x if x is not None else unknown for x in lats]
        g.bal = [x / top_lat for x in g.fast]
        weights = [c.weight for c in alive]
        g.cum_weights, g.weights_sum = list(accumulate(weights)), sum(weights)
        g.plans = {}
        g.lo, g.hi = lo, hi
        g.version, g.brk_ver = cap.version, self._brk_ver
        g.brk_len = len(local) if local is not None else -1

    def _best_idx(
        self,
        g: _Group,
        C: list[_Cand],
        K: list[float],
        L: list[float | None],
        P: list[int],
        F: list[int],
        strategy: str,
        plan: _Plan | None,
    ) -> int:
        """`_best` over flat lists (same scores, same use of the random generator). With a
        plan (nothing filtered the snapshot), the scores' minimum and ties come from it."""
        rng = self.rng
        n = len(C)
        if strategy == "weighted":
            if plan is not None:
                if g.weights_sum > 0:
                    return rng.choices(range(n), cum_weights=g.cum_weights)[0]
            else:
                weights = [c.weight for c in C]
                if sum(weights) > 0:
                    return rng.choices(range(n), weights)[0]
            strategy = "balanced"
        ties = plan.ties.get(strategy) if plan is not None else None
        if ties is None:
            ties = self._ties(g, C, K, L, strategy, plan is not None)
            if plan is not None:
                plan.ties[strategy] = ties
        if len(ties) == 1:
            return ties[0]
        a, b = rng.sample(ties, 2)  # power of two choices: the less loaded of two at random
        return a if self._load(g, P[a], F) <= self._load(g, P[b], F) else b

    @staticmethod
    def _ties(
        g: _Group,
        C: list[_Cand],
        K: list[float],
        L: list[float | None],
        strategy: str,
        pristine: bool,
    ) -> list[int]:
        """Indices whose score is within TIE of the best, in order."""
        if strategy == "cheapest":
            S = K
        elif pristine:  # the latency terms were computed with the snapshot
            if strategy == "fastest":
                S = g.fast
            else:
                top_cost = max(K) or 1.0
                S = [k / top_cost + b for k, b in zip(K, g.bal, strict=True)]
        else:
            known = [x for x in L if x is not None]
            unknown = min(known) if known else 0.0
            if strategy == "fastest":
                S = [x if x is not None else unknown for x in L]
            else:
                top_cost = max(K) or 1.0
                top_lat = max(known) if known and max(known) > 0 else 1.0
                S = [
                    k / top_cost + (x if x is not None else unknown) / top_lat
                    for k, x in zip(K, L, strict=True)
                ]
        low = min(S)
        limit = low + abs(low) * TIE + 1e-12
        i = S.index(low)
        if min(S[:i] + S[i + 1 :]) > limit:  # the usual case: no tie
            return [i]
        return [j for j, s in enumerate(S) if s <= limit]

    @staticmethod
    def _load(g: _Group, pi: int, F: list[int]) -> float:
        total = g.ploads[pi][1].slots_total or 1
        return (total - F[pi]) / total

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
