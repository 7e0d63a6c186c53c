"""Agent loops and waits: the transitions that grow a chain at run time. Pure, no I/O.

An agent-loop step is an LLM step with `loop`. When the model answers with tool calls, each call
becomes a tool step of its own (id `<loop>--<iteration>-<k>`, recorded in state with its spec
and its parent); when all of an iteration's calls have ended, the loop step is dispatched again
with the transcript: the assistant's tool calls and one tool message per result. A tool that
fails gives the model an error message as its result, so the model can react. The loop ends with
an answer (no tool calls), or fails the chain at its limit of iterations, tokens or cost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import msgspec

from chainyard.contracts import (
    ChainState,
    ErrorInfo,
    LlmStep,
    Message,
    Output,
    StepCompleted,
    StepState,
    ToolSpec,
    ToolStep,
    WaitStep,
)

from .catalog import tool_target

SEP = "--"


def spec_of(state: ChainState, step_id: str):
    """The step's definition: from the chain, or recorded in state for a tool call of a loop."""
    st = state.steps.get(step_id)
    if st is not None and st.spec is not None:
        return st.spec
    return state.chain.step(step_id)


def is_loop(step: object) -> bool:
    return isinstance(step, LlmStep) and step.loop is not None


def call_id(loop_id: str, iteration: int, k: int) -> str:
    return f"{loop_id[:48]}{SEP}{iteration}-{k}"


def loop_request(step: LlmStep, st: StepState, tool_specs: Mapping[str, ToolSpec]) -> LlmStep:
    """The LLM step as it is sent on this iteration: its messages plus the transcript so far,
    and the loop's tools (the step's own specs win over what tool workers advertise).

    The last call `max_iterations` allows is offered no tools, so the model has to answer with
    what it has instead of the loop failing at its limit."""
    assert step.loop is not None
    own = {t.name: t for t in step.tools}
    tools = [own.get(n) or tool_specs.get(n) or ToolSpec(name=n) for n in step.loop.tools]
    if st.iterations + 1 >= step.loop.max_iterations:
        tools = []
    return msgspec.structs.replace(step, messages=[*step.messages, *st.transcript], tools=tools)


def _limit_reached(step: LlmStep, st: StepState) -> str | None:
    loop = step.loop
    assert loop is not None
    if st.iterations >= loop.max_iterations:
        return f"max_iterations={loop.max_iterations}"
    tokens = st.usage.input_tokens + st.usage.output_tokens
    if loop.max_tokens is not None and tokens >= loop.max_tokens:
        return f"max_tokens={loop.max_tokens} (used {tokens})"
    if loop.max_cost_usd is not None and st.cost_usd >= loop.max_cost_usd:
        return f"max_cost_usd={loop.max_cost_usd} (spent {st.cost_usd:.6f})"
    return None


class LoopTurn(msgspec.Struct, frozen=True, kw_only=True):
    """What a loop step's completion leads to."""

    steps: dict[str, StepState]
    dispatch: list[str] = []
    answered: bool = False  # the loop is over: the step is completed
    limit: str | None = None  # the loop hit a limit: the chain fails with this reason


def on_loop_completed(state: ChainState, ev: StepCompleted, now_ms: int) -> LoopTurn:
    step = spec_of(state, ev.step_id)
    st = state.steps[ev.step_id]
    usage = st.usage + ev.usage
    cost = st.cost_usd + ev.cost_usd
    steps = dict(state.steps)
    calls = ev.output.tool_calls
    if not calls:
        steps[ev.step_id] = msgspec.structs.replace(
            st, status="completed", output=ev.output, usage=usage, cost_usd=cost,
            latency_ms=ev.latency_ms, target=ev.target, error=None,
        )  # fmt: skip
        return LoopTurn(steps=steps, answered=True)
    st = msgspec.structs.replace(
        st, usage=usage, cost_usd=cost, iterations=st.iterations + 1, target=ev.target
    )
    if limit := _limit_reached(step, st):
        steps[ev.step_id] = msgspec.structs.replace(st, status="failed")
        return LoopTurn(
            steps=steps, limit=f"agent loop {ev.step_id!r} stopped at {limit} without an answer"
        )
    assistant = Message(role="assistant", content=ev.output.text, tool_calls=calls)
    transcript = [*st.transcript, assistant]
    allowed = set(step.loop.tools)
    ids: list[str] = []
    for k, call in enumerate(calls):
        sid = call_id(ev.step_id, st.iterations, k)
        ids.append(sid)
        if call.name not in allowed:
            # Not a tool this loop may call: answer the model at once instead of running it.
            err = ErrorInfo(
                cls="fatal", message=f"tool {call.name!r} is not available in this loop"
            )
            tool = call.name if _name_ok(call.name) else "unknown"
            steps[sid] = StepState(
                status="failed",
                error=err,
                parent=ev.step_id,
                spec=ToolStep(id=sid, tool=tool, args=call.args),
            )
        else:
            steps[sid] = StepState(
                status="dispatched", attempt=1, dispatched_at_ms=now_ms, parent=ev.step_id,
                spec=ToolStep(id=sid, tool=call.name, args=call.args),
                target=tool_target(call.name),
            )  # fmt: skip
    steps[ev.step_id] = msgspec.structs.replace(
        st, status="waiting", transcript=transcript, calls=ids
    )
    turn = LoopTurn(steps=steps, dispatch=[i for i in ids if steps[i].status == "dispatched"])
    return _maybe_resume(state, turn, ev.step_id, now_ms)


def _name_ok(name: str) -> bool:
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "_-" for c in name)


def on_call_ended(
    state: ChainState, steps: dict[str, StepState], call: str, now_ms: int
) -> LoopTurn:
    """A loop's tool call ended (completed or failed for good): resume its loop if it was the
    last of the iteration."""
    parent = steps[call].parent
    assert parent is not None
    return _maybe_resume(state, LoopTurn(steps=steps), parent, now_ms)


def _maybe_resume(state: ChainState, turn: LoopTurn, loop_id: str, now_ms: int) -> LoopTurn:
    steps = dict(turn.steps)
    st = steps[loop_id]
    if any(steps[c].status not in ("completed", "failed") for c in st.calls):
        return turn
    results = [_tool_message(steps, c, st) for c in st.calls]
    steps[loop_id] = msgspec.structs.replace(
        st, status="dispatched", attempt=st.attempt + 1, dispatched_at_ms=now_ms,
        transcript=[*st.transcript, *results], calls=[],
    )  # fmt: skip
    return LoopTurn(steps=steps, dispatch=[*turn.dispatch, loop_id])


def _tool_message(steps: Mapping[str, StepState], call: str, loop: StepState) -> Message:
    st = steps[call]
    k = int(call.rsplit("-", 1)[1])
    asked = loop.transcript[-1].tool_calls[k]
    if st.status == "failed":
        content = f"error: {st.error.message if st.error else 'the tool failed'}"
    elif st.output is None:
        content = ""
    elif st.output.data is not None:
        content = json.dumps(st.output.data, ensure_ascii=False)
    else:
        content = st.output.text
    return Message(role="tool", content=content, tool_call_id=asked.id)


def wait_ready(state: ChainState, steps: dict[str, StepState], step_id: str, now_ms: int) -> bool:
    """A wait step became ready: complete it at once if its signal already came; else wait.
    Returns True when it completed."""
    step = state.chain.step(step_id)
    assert isinstance(step, WaitStep)
    if step.signal in state.signals:
        steps[step_id] = StepState(
            status="completed", attempt=1, output=Output(data=state.signals[step.signal])
        )
        return True
    steps[step_id] = StepState(status="waiting", attempt=1, dispatched_at_ms=now_ms)
    return False
