"""Hedged requests (opt-in per step: `route.hedge_after_ms`).

When a step's attempt has not answered `hedge_after_ms` after dispatch (a durable timer of kind
`hedge`), the same step goes to the next-best deployment under attempt number
`HEDGE_BASE + attempt` (`Assignment.hedge = True`, a distinct message id). Both attempts are
live: the first result wins and settles the step; the other's event then finds the step ended
(the engine's "not current" path) and changes nothing, so the step is paid for and counted once.
A failure of one of the two while the other runs only marks it dead. The hedge's estimate is
reserved in the chain budget like any dispatch, and a hedge that does not fit is not sent.
"""

from __future__ import annotations

import msgspec

from chainyard.contracts import ChainState, LlmStep, StepFailed, StepState, Target

HEDGE_BASE = 100  # attempts above this are hedges (max_attempts is at most 20)


def live_attempts(st: StepState) -> tuple[int, ...]:
    """The attempts of a dispatched step whose result is still awaited."""
    if st.hedge_attempt and st.hedge_attempt not in st.dead:
        if st.attempt in st.dead:
            return (st.hedge_attempt,)
        return (st.attempt, st.hedge_attempt)
    return (st.attempt,)


def is_current(state: ChainState, step_id: str, attempt: int) -> bool:
    st = state.steps.get(step_id)
    return (
        state.status == "running"
        and st is not None
        and st.status == "dispatched"
        and attempt in live_attempts(st)
    )


def drop_attempt(state: ChainState, ev: StepFailed) -> ChainState | None:
    """One of two live attempts failed: mark it dead and let the other decide; None if it was
    the only live attempt (the ordinary failure path applies)."""
    st = state.steps[ev.step_id]
    if len(live_attempts(st)) < 2:
        return None
    new = msgspec.structs.replace(
        st,
        dead=[*st.dead, ev.attempt],
        tried=[*st.tried, ev.target.deployment],
        error=ev.error,
        hedge_reserved_usd=0.0 if ev.attempt == st.hedge_attempt else st.hedge_reserved_usd,
        reserved_usd=0.0 if ev.attempt == st.attempt else st.reserved_usd,
    )
    return msgspec.structs.replace(state, steps={**state.steps, ev.step_id: new})


def hedge_wanted(state: ChainState, step_id: str, attempt: int) -> bool:
    st = state.steps.get(step_id)
    return (
        state.status == "running"
        and st is not None
        and st.status == "dispatched"
        and st.attempt == attempt
        and st.hedge_attempt == 0
        and attempt not in st.dead
        and st.target is not None
    )


def hedge_after_ms(state: ChainState, step_id: str) -> int | None:
    try:
        spec = state.chain.step(step_id)
    except KeyError:
        return None
    if isinstance(spec, LlmStep) and spec.loop is None:
        return spec.route.hedge_after_ms
    return None


def with_hedge(state: ChainState, step_id: str, target: Target, reserved: float) -> ChainState:
    st = state.steps[step_id]
    new = msgspec.structs.replace(
        st, hedge_attempt=HEDGE_BASE + st.attempt, hedge_target=target, hedge_reserved_usd=reserved
    )
    return msgspec.structs.replace(state, steps={**state.steps, step_id: new})
