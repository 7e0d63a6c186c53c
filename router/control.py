"""Transitions a client or a timer causes: cancel, signal, wait timeout, replay. Pure, no I/O."""

from __future__ import annotations

from typing import Any

import msgspec

from chainyard.contracts import (
    Chain,
    ChainState,
    ErrorInfo,
    LlmStep,
    Output,
    Replay,
    StepState,
    Timer,
    WaitStep,
)

from . import graph
from .chains import Outcome, Pick, _advance, _fail, begin, cancelled_event, followups


class ControlError(ValueError):
    """A control request that cannot apply; the message says why, for the sender. `effects`:
    what the recorded state implies, to perform again before refusing (deduplicated)."""

    def __init__(self, message: str, effects: Outcome | None = None) -> None:
        super().__init__(message)
        self.effects = effects


class UnknownChain(ControlError):
    """No state for the chain (yet: it may still be waiting in the intake stream)."""


def cancel(state: ChainState, reason: str, now_ms: int) -> Outcome:
    if state.status != "running":
        # Refused; but a chain cancelled already (maybe by this very message, before a crash
        # cut off its effects) gets the effects again, so `chain.cancelled` surely went out.
        again = followups(state, now_ms) if state.status == "cancelled" else None
        if again is not None:
            again.cancel = True
        raise ControlError(f"chain {state.chain.id!r} already ended ({state.status})", again)
    steps = {
        sid: msgspec.structs.replace(st, status="cancelled")
        if st.status in ("pending", "dispatched", "waiting")
        else st
        for sid, st in state.steps.items()
    }
    state = msgspec.structs.replace(
        state, steps=steps, status="cancelled", ended_at_ms=now_ms, reason=reason
    )
    return Outcome(state=state, ended=cancelled_event(state), cancel=True)


def signal(state: ChainState, name: str, data: Any, now_ms: int, pick: Pick) -> Outcome:
    """Record a signal; a wait step waiting for it completes with `data` as its output."""
    if state.status != "running":
        raise ControlError(f"chain {state.chain.id!r} already ended ({state.status})")
    if name in state.signals:
        return Outcome(state=state)  # the same signal again: changes nothing
    state = msgspec.structs.replace(state, signals={**state.signals, name: data})
    steps = dict(state.steps)
    woke = False
    for s in state.chain.steps:
        if isinstance(s, WaitStep) and s.signal == name and steps[s.id].status == "waiting":
            steps[s.id] = msgspec.structs.replace(
                steps[s.id], status="completed", output=Output(data=data)
            )
            woke = True
    state = msgspec.structs.replace(state, steps=steps)
    return _advance(state, now_ms, pick, []) if woke else Outcome(state=state)


def wait_timeout(state: ChainState, timer: Timer, now_ms: int) -> Outcome | None:
    """A wait step's timer fired: fail the chain if the step is still waiting."""
    st = state.steps.get(timer.step_id)
    if state.status != "running" or st is None or st.status != "waiting":
        return None  # the signal came first, or the chain ended: nothing to do
    step = state.chain.step(timer.step_id)
    assert isinstance(step, WaitStep)
    err = ErrorInfo(cls="timeout", message=f"no signal {step.signal!r} within {step.timeout_ms} ms")
    steps = {**state.steps, timer.step_id: msgspec.structs.replace(st, status="failed", error=err)}
    state = msgspec.structs.replace(state, steps=steps)
    return _fail(state, now_ms, f"step {timer.step_id!r}: {err.message}", timer.step_id, err)


def downstream(chain: Chain, step_id: str) -> set[str]:
    """`step_id` and every step that depends on it, directly or not."""
    out = {step_id}
    changed = True
    while changed:
        changed = False
        for s in chain.steps:
            if s.id not in out and graph.dependencies(s) & out:
                out.add(s.id)
                changed = True
    return out


def replay(old: ChainState, req: Replay, now_ms: int, pick: Pick) -> Outcome:
    """A new chain re-running `old` from `req.from_step`, reusing every output before it."""
    if old.status == "running":
        raise ControlError(f"chain {old.chain.id!r} is still running; replay an ended chain")
    ids = {s.id for s in old.chain.steps}
    if req.from_step not in ids:
        raise ControlError(f"chain {old.chain.id!r} has no step {req.from_step!r}")
    if unknown := set(req.overrides) - ids:
        raise ControlError(f"overrides name unknown steps: {', '.join(sorted(unknown))}")
    steps = []
    for s in old.chain.steps:
        o = req.overrides.get(s.id)
        if o is not None and isinstance(s, LlmStep):
            s = msgspec.structs.replace(s, model=o.model or s.model, route=o.route or s.route)
        elif o is not None:
            raise ControlError(f"step {s.id!r} is not an llm step: only llm steps take overrides")
        steps.append(s)
    chain = msgspec.structs.replace(old.chain, id=req.new_id, steps=steps, replay_of=old.chain.id)
    rerun = downstream(chain, req.from_step)
    kept = {
        sid: StepState(status="completed", attempt=0, output=st.output, target=st.target)
        for sid, st in old.steps.items()
        if sid in ids and sid not in rerun and st.status == "completed"
    }
    state = ChainState(
        chain=chain,
        tenant=old.tenant,
        steps={s.id: kept.get(s.id, StepState()) for s in chain.steps},
        created_at_ms=now_ms,
        deadline_at_ms=now_ms + chain.deadline_ms if chain.deadline_ms else None,
        signals=old.signals,
    )
    return begin(state, now_ms, pick)  # with its deadline timer, like any new chain
