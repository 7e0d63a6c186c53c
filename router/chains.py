"""Chain state transitions: pure functions from (state, event) to (new state, effects).

The engine applies a transition by compare-and-set and only then performs its effects, so a
redelivered event finds the transition already recorded and re-performs the same effects, which
the streams deduplicate by message id. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainFailed,
    ChainState,
    ErrorInfo,
    Step,
    StepCompleted,
    StepFailed,
    StepState,
    StepSummary,
    Target,
    Timer,
    WaitStep,
)

from . import graph, hedge, loops
from .policy import NoCapacity

# pick(step, deployments to avoid) -> a target, or a reason why there is none
Pick = Callable[[Step, list[str]], Target | str]
RETRY_ELSEWHERE = ("retryable", "context_window")
REDISPATCH_WINDOW_MS = 5 * 60_000  # half the streams' duplicate window
CAPACITY_RECHECK_MS = 500  # a step waiting for capacity looks again this often (router/routing.py)
Ended = ChainCompleted | ChainFailed | ChainCancelled
DEADLINE_EXCEEDED = "deadline exceeded"  # every reason for a chain past its deadline starts so
CHAIN_TIMER_STEP = "_chain"  # the step id of a timer of the whole chain (kind "deadline")
MAX_NAMED_STEPS = 10  # a deadline's reason names this many unfinished steps, then counts
MAX_ERROR_CHARS = 200  # of each one's last error


@dataclass
class Outcome:
    state: ChainState
    dispatch: list[str] = field(default_factory=list)  # steps whose assignment must go out
    ended: Ended | None = None
    retry_after_s: float | None = None  # come back to this event later (same deployment)
    timers: list[Timer] = field(default_factory=list)  # durable timers to schedule
    cancel: bool = False  # broadcast a cancel to the workers


def _replace(st: StepState, **kw: object) -> StepState:
    return msgspec.structs.replace(st, **kw)


def start(chain: Chain, tenant: str, now_ms: int, pick: Pick) -> Outcome:
    deadline = now_ms + chain.deadline_ms if chain.deadline_ms else None
    state = ChainState(
        chain=chain,
        tenant=tenant,
        steps={s.id: StepState() for s in chain.steps},
        created_at_ms=now_ms,
        deadline_at_ms=deadline,
    )
    return begin(state, now_ms, pick)


def begin(state: ChainState, now_ms: int, pick: Pick) -> Outcome:
    """A new chain's first steps, and the durable timer that ends it at its deadline."""
    out = _advance(state, now_ms, pick, [])
    if out.state.status == "running" and out.state.deadline_at_ms is not None:
        out.timers.append(deadline_timer(out.state))
    return out


def deadline_timer(state: ChainState) -> Timer:
    assert state.deadline_at_ms is not None
    return Timer(
        kind="deadline",
        tenant=state.tenant,
        chain_id=state.chain.id,
        step_id=CHAIN_TIMER_STEP,
        attempt=0,
        due_at_ms=state.deadline_at_ms,
    )


def deadline_waits(state: ChainState) -> bool:
    """An ended chain's deadline timer is still to come: the chain had one and ended first."""
    if state.status == "running" or state.deadline_at_ms is None:
        return False
    return (state.ended_at_ms or 0) < state.deadline_at_ms


def on_deadline(state: ChainState, now_ms: int) -> Outcome:
    """The chain's deadline timer fired: a chain still running fails, naming what was left
    unfinished and why, and its work in flight is cancelled (queued work is dropped by the
    workers: it carries the same deadline)."""
    if state.status != "running":
        # Ended first, or by this very timer before a crash: its end event (deduplicated) and,
        # if the deadline ended it, the cancel broadcast again (workers repeat it harmlessly).
        out = followups(state, now_ms)
        out.cancel = (state.reason or "").startswith(DEADLINE_EXCEEDED)
        return out
    assert state.deadline_at_ms is not None
    if now_ms < state.deadline_at_ms:  # this router's clock is behind: come back when due
        return Outcome(state=state, retry_after_s=(state.deadline_at_ms - now_ms) / 1000)
    ready = set(graph.advance(state.chain, state.steps).ready)
    steps = dict(state.steps)
    unfinished: list[str] = []
    for sid, st in state.steps.items():
        if st.status not in ("pending", "dispatched", "waiting"):
            continue
        # Dropped with the chain, as by a cancel: "failed" would claim a step.failed event
        # that no worker sent (the ledger checks that every failed step has one).
        steps[sid] = _replace(st, status="cancelled")
        if st.parent is None:
            unfinished.append(_unfinished(state, sid, st, sid in ready))
    shown = unfinished[:MAX_NAMED_STEPS]
    if len(unfinished) > len(shown):
        shown.append(f"{len(unfinished) - len(shown)} more")
    reason = f"{DEADLINE_EXCEEDED} ({state.chain.deadline_ms} ms); unfinished: " + "; ".join(shown)
    out = _fail(msgspec.structs.replace(state, steps=steps), now_ms, reason, None, None)
    out.cancel = True
    return out


def _unfinished(state: ChainState, sid: str, st: StepState, ready: bool) -> str:
    """What a step was doing when the deadline passed, with its last error if it had one."""
    if st.status == "dispatched":
        # Dispatched: running in a worker, or still queued for one (the router cannot tell).
        where = f" to {st.target.deployment}" if st.target else ""
        what = f"step {sid!r} dispatched{where} (attempt {st.attempt}"
        if st.error is not None:
            what += f", last error: {st.error.cls}: {st.error.message[:MAX_ERROR_CHARS]}"
        return what + ")"
    if st.status == "waiting":
        spec = state.chain.step(sid)
        if isinstance(spec, WaitStep):
            return f"step {sid!r} waiting for signal {spec.signal!r}"
        return f"step {sid!r} waiting for its tool calls"
    if ready and st.error is not None:  # waiting for capacity: why (router/routing.py)
        return f"step {sid!r} not started: {st.error.message[:MAX_ERROR_CHARS]}"
    if ready:
        return f"step {sid!r} not started (no capacity)"
    return f"step {sid!r} not started"


def on_completed(state: ChainState, ev: StepCompleted, now_ms: int, pick: Pick) -> Outcome:
    st = state.steps[ev.step_id]
    if loops.is_loop(loops.spec_of(state, ev.step_id)):
        turn = loops.on_loop_completed(state, ev, now_ms)
        return _after_turn(state, turn, now_ms, pick)
    steps = dict(state.steps)
    steps[ev.step_id] = _replace(
        st,
        status="completed",
        output=ev.output,
        usage=ev.usage,
        cost_usd=st.cost_usd + ev.cost_usd,
        latency_ms=ev.latency_ms,
        target=ev.target,
        error=None,
        cached=ev.cached,
    )
    if st.parent is not None:  # a loop's tool call: its loop may resume
        return _after_turn(
            state, loops.on_call_ended(state, steps, ev.step_id, now_ms), now_ms, pick
        )
    return _advance(msgspec.structs.replace(state, steps=steps), now_ms, pick, [])


def _after_turn(state: ChainState, turn: loops.LoopTurn, now_ms: int, pick: Pick) -> Outcome:
    state = msgspec.structs.replace(state, steps=turn.steps)
    if turn.limit:
        return _fail(state, now_ms, turn.limit, None, None)
    if turn.answered:
        return _advance(state, now_ms, pick, [])
    return Outcome(state=state, dispatch=turn.dispatch)


def on_failed(
    state: ChainState,
    ev: StepFailed,
    now_ms: int,
    pick: Pick,
    max_attempts: int,
    due: bool,
    wait_until_ms: float | None = None,
) -> Outcome:
    """A failed attempt: fail over to another deployment, retry after Retry-After, or give up.

    `due` says the event's own Retry-After has passed (the engine delays the event until then);
    while the only deployment left has no capacity (throttled, breaker open), the event waits
    too, until `wait_until_ms` (None: the chain's deadline, if any).
    """
    st = state.steps[ev.step_id]
    tried = [*st.tried, ev.target.deployment]
    steps = dict(state.steps)
    if ev.error.cls in RETRY_ELSEWHERE and len(tried) < max_attempts:
        step = loops.spec_of(state, ev.step_id)
        target = pick(step, tried)
        if isinstance(target, str) and ev.error.cls == "retryable":
            # Nowhere else to go: the same deployment again, once its Retry-After has passed.
            if ev.error.retry_after_s and not due:
                return Outcome(state=state, retry_after_s=ev.error.retry_after_s)
            target = pick(step, [])
            until = wait_until_ms if wait_until_ms is not None else state.deadline_at_ms
            if isinstance(target, NoCapacity) and (until is None or now_ms < until):
                # Still throttled or cooling down (often by this very 429): look again soon,
                # the event waiting durably in its stream.
                return Outcome(state=state, retry_after_s=CAPACITY_RECHECK_MS / 1000)
        if not isinstance(target, str):
            steps[ev.step_id] = _replace(
                st,
                status="dispatched",
                attempt=st.attempt + 1,
                target=target,
                tried=tried,
                dispatched_at_ms=now_ms,
                error=ev.error,
            )
            return Outcome(state=msgspec.structs.replace(state, steps=steps), dispatch=[ev.step_id])
    steps[ev.step_id] = _replace(st, status="failed", tried=tried, error=ev.error)
    if st.parent is not None:  # a loop's tool call failed for good: the model is told
        return _after_turn(
            state, loops.on_call_ended(state, steps, ev.step_id, now_ms), now_ms, pick
        )
    past_deadline = state.deadline_at_ms is not None and now_ms >= state.deadline_at_ms
    why = _failure_reason(ev, st.attempt, max_attempts, past_deadline)
    return _fail(msgspec.structs.replace(state, steps=steps), now_ms, why, ev.step_id, ev.error)


def _failure_reason(ev: StepFailed, attempt: int, max_attempts: int, past_deadline: bool) -> str:
    where = f"step {ev.step_id!r} on {ev.target.deployment}"
    if ev.error.cls == "expired" or (ev.error.cls == "timeout" and past_deadline):
        return f"{DEADLINE_EXCEEDED}: {where}: {ev.error.message}"
    if ev.error.cls == "timeout":  # its own limit (a tool's timeout), not the chain's deadline
        return f"{where} timed out: {ev.error.message}"
    if ev.error.cls in RETRY_ELSEWHERE and attempt >= max_attempts:
        return f"{where} failed {attempt} times, last: {ev.error.message}"
    return f"{where} failed ({ev.error.cls}): {ev.error.message}"


def _advance(state: ChainState, now_ms: int, pick: Pick, dispatch: list[str]) -> Outcome:
    adv = graph.advance(state.chain, state.steps)
    if adv.failed_dep:
        return _fail(state, now_ms, f"step {adv.failed_dep!r} failed", adv.failed_dep, None)
    if state.deadline_at_ms is not None and now_ms > state.deadline_at_ms and adv.ready:
        why = f"{DEADLINE_EXCEEDED} before the next step could start"
        # Why they had not started (recorded when they began to wait): the cause, not only
        # the deadline.
        waits = [
            f"step {sid!r}: {st.error.message[:MAX_ERROR_CHARS]}"
            for sid in adv.ready
            if (st := state.steps[sid]).status == "pending" and st.error is not None
        ]
        if waits:
            why += ": " + "; ".join(waits[:MAX_NAMED_STEPS])
        return _fail(state, now_ms, why, None, None)
    steps = dict(state.steps)
    timers: list[Timer] = []
    for sid in adv.skipped:
        steps[sid] = _replace(steps[sid], status="skipped")
    for sid in adv.ready:
        spec = state.chain.step(sid)
        if isinstance(spec, WaitStep):
            if loops.wait_ready(state, steps, sid, now_ms):  # its signal had already come
                return _advance(msgspec.structs.replace(state, steps=steps), now_ms, pick, dispatch)
            if spec.timeout_ms is not None:
                timers.append(_timer(state, sid, "wait_timeout", now_ms + spec.timeout_ms))
            continue
        step = graph.resolve(spec, steps)
        target = pick(step, [])
        if isinstance(target, NoCapacity):  # may clear by itself: wait on a durable timer
            timers.append(_timer(state, sid, "capacity", now_ms + CAPACITY_RECHECK_MS))
            # Kept with the step, so a deadline that ends the wait can say why it waited.
            steps[sid] = _replace(steps[sid], error=ErrorInfo(cls="retryable", message=str(target)))
            continue
        if isinstance(target, str):
            return _fail(msgspec.structs.replace(state, steps=steps), now_ms, target, sid, None)
        steps[sid] = _replace(
            steps[sid],
            status="dispatched",
            attempt=1,
            target=target,
            dispatched_at_ms=now_ms,
            error=None,  # a capacity wait's reason, now over
        )
        dispatch.append(sid)
    state = msgspec.structs.replace(state, steps=steps)
    if adv.done:
        state = msgspec.structs.replace(state, status="completed", ended_at_ms=now_ms)
        return Outcome(state=state, ended=completed_event(state))
    return Outcome(state=state, dispatch=dispatch, timers=timers)


def _timer(state: ChainState, step_id: str, kind: str, due_at_ms: int) -> Timer:
    return Timer(
        kind=kind,  # type: ignore[arg-type]
        tenant=state.tenant,
        chain_id=state.chain.id,
        step_id=step_id,
        attempt=state.steps[step_id].attempt,
        due_at_ms=due_at_ms,
    )


def _fail(
    state: ChainState, now_ms: int, reason: str, step_id: str | None, error: ErrorInfo | None
) -> Outcome:
    state = msgspec.structs.replace(state, status="failed", ended_at_ms=now_ms, reason=reason)
    ended = ChainFailed(
        chain_id=state.chain.id,
        tenant=state.tenant,
        reason=reason,
        step_id=step_id,
        error=error,
        usage=state.usage,
        cost_usd=state.cost_usd,
        duration_ms=float(now_ms - state.created_at_ms),
        steps=summaries(state),
        digest=state.digest,
        metadata=state.chain.metadata,
    )
    return Outcome(state=state, ended=ended)


def summaries(state: ChainState) -> list[StepSummary]:
    return [
        StepSummary(
            step_id=sid,
            status=st.status,
            attempts=st.attempt,
            pool=st.target.pool if st.target else None,
            model=st.target.model if st.target else None,
            latency_ms=st.latency_ms,
            usage=st.usage,
            cost_usd=st.cost_usd,
            error=st.error.message if st.error and st.status == "failed" else None,
            deployment=st.target.deployment if st.target else None,
            cached=st.cached,
        )
        for sid, st in state.steps.items()
    ]


def completed_event(state: ChainState) -> ChainCompleted:
    return ChainCompleted(
        chain_id=state.chain.id,
        tenant=state.tenant,
        output=graph.chain_output(state.chain, state.steps),
        usage=state.usage,
        cost_usd=state.cost_usd,
        duration_ms=_duration(state),
        steps=summaries(state),
        digest=state.digest,
        metadata=state.chain.metadata,
    )


def ended_event(state: ChainState) -> Ended | None:
    """The terminal event of an ended chain, rebuilt from state (for idempotent re-publish)."""
    if state.status == "completed":
        return completed_event(state)
    if state.status == "cancelled":
        return cancelled_event(state)
    if state.status == "failed":
        failed = [
            sid for sid, st in state.steps.items() if st.status == "failed" and st.parent is None
        ]
        sid = failed[0] if failed else None
        return ChainFailed(
            chain_id=state.chain.id,
            tenant=state.tenant,
            reason=state.reason or state.status,
            step_id=sid,
            error=state.steps[sid].error if sid else None,
            usage=state.usage,
            cost_usd=state.cost_usd,
            duration_ms=_duration(state),
            steps=summaries(state),
            digest=state.digest,
            metadata=state.chain.metadata,
        )
    return None


def cancelled_event(state: ChainState) -> ChainCancelled:
    return ChainCancelled(
        chain_id=state.chain.id,
        tenant=state.tenant,
        reason=state.reason or "cancelled",
        usage=state.usage,
        cost_usd=state.cost_usd,
        duration_ms=_duration(state),
        steps=summaries(state),
        digest=state.digest,
        metadata=state.chain.metadata,
    )


def _duration(state: ChainState) -> float:
    return float((state.ended_at_ms or state.created_at_ms) - state.created_at_ms)


def followups(state: ChainState, now_ms: int) -> Outcome:
    """The effects the recorded state implies, to perform again after a crash or a duplicate.

    Safe to repeat: assignments, timers and chain events carry deterministic message ids, and
    the streams drop a repeat within their duplicate window. Only steps dispatched within half
    that window are re-sent, so a repeat can never reach a worker as new work. Timers re-sent:
    wait timeouts, hedges of re-sent dispatches not hedged yet, the capacity recheck of
    every ready step still pending (a repeat that outlives the window only looks again), and
    the chain's deadline timer (a repeat that outlives the window finds the chain ended, or
    ends it once: on_deadline is idempotent).
    """
    if state.status != "running":
        # Within the window a repeat of the end is dropped by the stream; past it, the end
        # went out long ago and a repeat would be a second one in the log.
        recent = now_ms - (state.ended_at_ms or 0) < REDISPATCH_WINDOW_MS
        return Outcome(state=state, ended=ended_event(state) if recent else None)
    dispatch = [
        sid
        for sid, st in state.steps.items()
        if st.status == "dispatched" and now_ms - (st.dispatched_at_ms or 0) < REDISPATCH_WINDOW_MS
    ]
    timers = [
        _timer(state, sid, "wait_timeout", (st.dispatched_at_ms or now_ms) + spec.timeout_ms)
        for sid, st in state.steps.items()
        if st.status == "waiting"
        and isinstance(spec := loops.spec_of(state, sid), WaitStep)
        and spec.timeout_ms is not None
    ]
    # Hedge timers of the re-sent dispatches that have no hedge yet (same ids as the first).
    for sid in dispatch:
        st = state.steps[sid]
        wait = hedge.hedge_after_ms(state, sid)
        if wait is not None and hedge.hedge_wanted(state, sid, st.attempt):
            timers.append(_timer(state, sid, "hedge", (st.dispatched_at_ms or now_ms) + wait))
    # Ready steps still pending are waiting for capacity: their timer (one per step and
    # attempt: a repeat within the duplicate window is dropped) looks again.
    for sid in graph.advance(state.chain, state.steps).ready:
        st = state.steps[sid]
        if st.status == "pending" and not isinstance(state.chain.step(sid), WaitStep):
            timers.append(_timer(state, sid, "capacity", now_ms + CAPACITY_RECHECK_MS))
    if state.deadline_at_ms is not None:
        timers.append(deadline_timer(state))
    return Outcome(state=state, dispatch=dispatch, timers=timers)
