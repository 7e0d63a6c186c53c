"""Strategies: which of the eligible deployments gets the step.

- `cheapest`: the lowest estimated cost;
- `fastest`: the lowest predicted latency; an unmeasured deployment counts as fast as the
  fastest measured one, so it gets tried;
- `balanced`: cost and predicted latency, each relative to the worst candidate, added;
- `weighted`: random, proportional to each deployment's weight (`balanced` when all are 0).

Scores within TIE of the best are a tie, which goes to the less loaded of two random choices
(power of two choices). `best` is the reference, over the reference loop's tuples; `best_index`
gives the same answer, with the same use of the random generator, over the cached decision's
flat lists.
"""

from __future__ import annotations

import random

from chainyard.contracts import Deployment

from .candidates import Candidate, Group, Plan

TIE = 0.02  # scores within 2% of the best are a tie
# (deployment, cost, predicted latency or None, free slots, load)
Eligible = tuple[Deployment, float, float | None, int, float]


def best(ok: list[Eligible], strategy: str, rng: random.Random) -> Eligible:
    """The reference: the strategy's choice among the eligible, spelled out."""
    if strategy == "weighted":
        weights = [max(c[0].weight, 0.0) for c in ok]
        if sum(weights) > 0:
            return rng.choices(ok, weights)[0]
        strategy = "balanced"
    known = [c[2] for c in ok if c[2] is not None]
    unknown = min(known) if known else 0.0  # unmeasured counts as the fastest: it gets tried
    if strategy == "cheapest":
        scores = [c[1] for c in ok]
    elif strategy == "fastest":
        scores = [c[2] if c[2] is not None else unknown for c in ok]
    else:  # balanced
        top_cost = max(c[1] for c in ok) or 1.0
        top_lat = max(known) if known and max(known) > 0 else 1.0
        scores = [c[1] / top_cost + (c[2] if c[2] is not None else unknown) / top_lat for c in ok]
    low = min(scores)
    ties = [c for c, s in zip(ok, scores, strict=True) if s <= low + abs(low) * TIE + 1e-12]
    if len(ties) == 1:
        return ties[0]
    a, b = rng.sample(ties, 2)
    return a if a[4] <= b[4] else b


def best_index(
    rng: random.Random,
    g: Group,
    C: list[Candidate],
    K: list[float],
    L: list[float | None],
    P: list[int],
    F: list[int],
    strategy: str,
    plan: Plan | None,
) -> int:
    """`best` over flat lists: candidates, costs, latencies, pool indices and the pools' free
    slots. With a plan (nothing filtered the snapshot), the ties come from it."""
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
        ties = _ties(g, K, L, strategy, plan is not None)
        if plan is not None:
            plan.ties[strategy] = ties
    if len(ties) == 1:
        return ties[0]
    a, b = rng.sample(ties, 2)
    return a if _load(g, P[a], F) <= _load(g, P[b], F) else b


def near_first(
    far: list[bool], costs: list[float], free: list[int], margin: float
) -> list[int] | None:
    """Region preference: the indices of the eligible to keep (None: keep them all).

    Near ones (in the router's region, or without a region) are kept; a far one only when it
    is cheaper than the cheapest near one by more than `margin` (a fraction of that cost).
    When no near one has a free slot and a far one has, nothing is dropped: capacity elsewhere
    beats queueing at home (the free-slot rule that follows then picks among those with room).
    A near one that is not eligible (breaker open, no live workers, tried) is not here at all,
    which is the failover across regions.
    """
    near = [i for i, f in enumerate(far) if not f]
    if not near or len(near) == len(far):
        return None
    if not any(free[i] > 0 for i in near) and any(free[i] > 0 for i, f in enumerate(far) if f):
        return None
    bar = min([costs[i] for i in near]) * (1.0 - margin)
    keep = [i for i, f in enumerate(far) if not f or costs[i] < bar]
    return keep if len(keep) < len(far) else None


def _ties(
    g: Group, K: list[float], L: list[float | None], strategy: str, whole_snapshot: bool
) -> list[int]:
    """Indices whose score is within TIE of the best, in order."""
    if strategy == "cheapest":
        S = K
    elif whole_snapshot:  # the latency terms were computed with the snapshot
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


def _load(g: Group, pi: int, F: list[int]) -> float:
    total = g.ploads[pi][1].slots_total or 1
    return (total - F[pi]) / total
