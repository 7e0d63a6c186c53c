"""The routing policy's cache: who can serve a step, and who of them can take work now.

Two layers per (model or group, avoid, capabilities), a `Group`:

- what never changes: the candidates in catalog order, with their prices, context windows
  and weights (`Candidate`);
- a live snapshot of the candidates passing the checks that do not depend on the step (the
  breaker and Retry-After cool-down, a fresh heartbeat, the provider's throttling), with their
  latencies. It is rebuilt only when the capacity view or a breaker changes, or when the clock
  crosses a time at which one of those checks flips.

Per snapshot, a `Plan` per (input tokens, output tokens) keeps the costs and, per strategy, the
candidates tied for the best score, so repeated picks of similar steps only do arithmetic that
depends on the step. `Policy.choose` reads these; `Policy._choose_slow` does not.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

from chainyard.contracts import Deployment, LlmStep

from .breakers import Breakers
from .capacity import CapacityView, PoolLoad
from .catalog import Catalog

_NEVER = 1 << 62  # a time bound no clock reaches
_MAX_GROUPS = 1024  # route constraints come from users: bound the cache
_MAX_PLANS = 256  # per group snapshot
GroupKey = tuple[str, tuple[str, ...], tuple[str, ...]]  # (model, avoid, capabilities)


class Candidate:
    """What never changes about one candidate deployment."""

    __slots__ = ("d", "name", "pin", "pool", "pout", "prior", "weight", "window")

    def __init__(self, d: Deployment, pin: float, pout: float) -> None:
        self.d, self.name, self.pool, self.window = d, d.name, d.pool, d.context_window
        self.pin, self.pout = pin, pout
        self.weight = max(d.weight, 0.0)
        self.prior = d.expected_latency_ms


class Plan:
    """For one (input tokens, output tokens) over a whole snapshot: the costs, their top, and
    per strategy the indices tied for the best score."""

    __slots__ = ("costs", "ties", "top")

    def __init__(self, costs: list[float]) -> None:
        self.costs = costs
        self.top = max(costs)
        self.ties: dict[str, list[int]] = {}


class Group:
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

    def __init__(self, cands: list[Candidate]) -> None:
        self.cands = cands
        self.version = -1  # no snapshot yet
        self.brk_ver = self.brk_len = -1
        self.lo = self.hi = 0
        self.alive: list[Candidate] = []
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
        self.plans: dict[tuple[int, int], Plan] = {}

    def add_plan(self, inp: int, outp: int) -> Plan:
        """The whole snapshot's costs for this many input and output tokens."""
        if len(self.plans) >= _MAX_PLANS:
            self.plans.clear()
        p = self.plans[inp, outp] = Plan([inp * c.pin + outp * c.pout for c in self.alive])
        return p


class Candidates:
    """The groups of one catalog. `Policy.choose` checks that a group's snapshot is current
    (inline: a call costs a few percent of a pick) and asks for a refresh when it is not."""

    def __init__(
        self,
        catalog: Catalog,
        capacity: CapacityView,
        breakers: Breakers | None,
        price: Callable[[Deployment], tuple[float, float]],
    ) -> None:
        self.capacity = capacity
        self.breakers = breakers
        self.price = price  # (input, output) USD per token
        self.catalog = catalog  # the groups were built from it
        self.groups: dict[GroupKey, Group] = {}
        self.breaker_changes = 0  # seen through the breakers' on_change hook
        if breakers is not None:
            before = breakers.on_change

            def changed() -> None:
                self.breaker_changes += 1
                if before is not None:
                    before()

            breakers.on_change = changed

    def reset(self, catalog: Catalog) -> None:
        self.groups, self.catalog = {}, catalog

    def add(self, step: LlmStep, key: GroupKey) -> Group:
        """The step's group, new: its snapshot is built on first use."""
        if len(self.groups) >= _MAX_GROUPS:
            self.groups.clear()
        cands = [Candidate(d, *self.price(d)) for d in self.catalog.deployments(step)]
        g = self.groups[key] = Group(cands)
        return g

    def refresh(self, g: Group, t: int) -> None:
        """Rebuild the live snapshot: who passes the checks that do not depend on the step."""
        cap, brk = self.capacity, self.breakers
        pools, stats = cap.pools, cap.stats
        local = brk.local if brk is not None else None
        lo, hi = -_NEVER, _NEVER
        alive: list[Candidate] = []
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
        g.version, g.brk_ver = cap.version, self.breaker_changes
        g.brk_len = len(local) if local is not None else -1
