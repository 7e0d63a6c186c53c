"""Budgets: reserve before dispatch, settle on the result, all inside the chain-state CAS.

A chain's remaining budget is its `budget_usd` less what its steps cost so far, less what is
reserved for the attempts (and hedges) in flight. Every pick of a transition deducts its
estimate from one running remainder (so a fan-out of ten steps cannot spend the same dollar
ten times), and the transition records each reservation in the step's state: the same
compare-and-set that records the dispatch. A concurrent transition of the same chain (another
router, another event) fails its CAS, reads the new reservations and decides again.
"""

from __future__ import annotations

import msgspec

from chainyard.contracts import ChainState, StepState

from .policy import Picker


def remaining(state: ChainState, release: str | None = None) -> float | None:
    """USD left to reserve; None when the chain has no budget. `release`: a step whose
    reservation is being replaced (its attempt just ended)."""
    budget = state.chain.budget_usd
    if budget is None:
        return None
    spent = 0.0
    for sid, st in state.steps.items():
        spent += st.cost_usd
        if st.status == "dispatched" and sid != release:
            spent += st.reserved_usd + st.hedge_reserved_usd
    return budget - spent


def _cleared(st: StepState) -> StepState:
    return msgspec.structs.replace(
        st, reserved_usd=0.0, hedge_attempt=0, hedge_target=None, hedge_reserved_usd=0.0, dead=[]
    )


def seal(before: ChainState | None, after: ChainState, picker: Picker) -> ChainState:
    """Record the picks' reservations in `after` and release those of ended attempts."""
    steps: dict[str, StepState] | None = None
    for sid, st in after.steps.items():
        old = before.steps.get(sid) if before is not None else None
        new = st
        if st.status != "dispatched":
            if st.reserved_usd or st.hedge_attempt or st.hedge_reserved_usd or st.dead:
                new = _cleared(st)
        elif old is None or old.status != "dispatched" or old.attempt != st.attempt:
            new = _cleared(st) if (st.hedge_attempt or st.dead) else st
            if sid in picker.reserved:
                new = msgspec.structs.replace(new, reserved_usd=picker.reserved[sid])
        if new is not st:
            if steps is None:
                steps = dict(after.steps)
            steps[sid] = new
    return after if steps is None else msgspec.structs.replace(after, steps=steps)
