"""Chain state transitions (router/chains.py): pure, with a scripted pick function."""

from __future__ import annotations

import msgspec
import pytest

from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainFailed,
    ErrorInfo,
    LlmStep,
    Message,
    Output,
    Step,
    StepCompleted,
    StepFailed,
    Target,
    ToolStep,
    Usage,
)
from chainyard.router import chains, control

T0 = 1_000_000
DEPLOYMENTS = ["dep-a", "dep-b"]


def target(dep: str) -> Target:
    return Target(deployment=dep, pool=f"pool-{dep}", provider="openai", model="m")


class Picker:
    """Picks the first deployment not excluded; records every call."""

    def __init__(self, deployments: list[str] = DEPLOYMENTS) -> None:
        self.deployments = deployments
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, step: Step, exclude: list[str]) -> Target | str:
        self.calls.append((step.id, list(exclude)))
        left = [d for d in self.deployments if d not in exclude]
        return target(left[0]) if left else f"no deployment left for {step.id!r}"


def diamond() -> Chain:
    return Chain(
        id="c1",
        steps=[
            LlmStep(id="plan", model="m", messages=[Message(role="user", content="plan")]),
            ToolStep(id="s1", tool="search", args={"q": "{{steps.plan.output}}"}),
            ToolStep(id="s2", tool="search", args={"q": "x"}, after=["plan"]),
            LlmStep(
                id="answer",
                model="m",
                messages=[Message(role="user", content="{{steps.s1.output}}|{{steps.s2.output}}")],
            ),
        ],
    )


def completed(
    sid: str, attempt: int = 1, text: str = "out", dep: str = "dep-a", cost: float = 0.01
) -> StepCompleted:
    return StepCompleted(
        chain_id="c1",
        step_id=sid,
        attempt=attempt,
        tenant="t",
        output=Output(text=text),
        usage=Usage(input_tokens=3, output_tokens=2),
        cost_usd=cost,
        target=target(dep),
        worker="w",
        dispatched_at_ms=T0,
        started_at_ms=T0,
        latency_ms=12.5,
    )


def failed(
    sid: str,
    cls: str = "retryable",
    attempt: int = 1,
    dep: str = "dep-a",
    retry_after: float | None = None,
) -> StepFailed:
    return StepFailed(
        chain_id="c1",
        step_id=sid,
        attempt=attempt,
        tenant="t",
        error=ErrorInfo(
            cls=cls,
            message=f"boom {attempt}",
            status=503 if cls == "retryable" else 401,
            retry_after_s=retry_after,
        ),  # type: ignore[arg-type]
        target=target(dep),
        worker="w",
    )


def test_start_dispatches_roots_only() -> None:
    pick = Picker()
    out = chains.start(diamond(), "t", T0, pick)
    assert out.dispatch == ["plan"]
    assert out.ended is None
    st = out.state.steps["plan"]
    assert (st.status, st.attempt, st.target, st.dispatched_at_ms) == (
        "dispatched",
        1,
        target("dep-a"),
        T0,
    )
    assert all(out.state.steps[s].status == "pending" for s in ("s1", "s2", "answer"))
    assert out.state.status == "running" and out.state.tenant == "t"


def test_completion_emits_dependents_then_fan_in_then_chain_completed() -> None:
    pick = Picker()
    out = chains.start(diamond(), "t", T0, pick)
    out = chains.on_completed(out.state, completed("plan", text="P"), T0 + 1, pick)
    assert sorted(out.dispatch) == ["s1", "s2"]
    out = chains.on_completed(out.state, completed("s1", text="one"), T0 + 2, pick)
    assert out.dispatch == []  # answer still waits for s2
    out = chains.on_completed(out.state, completed("s2", text="two"), T0 + 3, pick)
    assert out.dispatch == ["answer"]
    out = chains.on_completed(out.state, completed("answer", text="final"), T0 + 4, pick)
    assert isinstance(out.ended, ChainCompleted)
    assert out.state.status == "completed"
    assert out.ended.output.text == "final"
    assert out.ended.cost_usd == 0.04
    assert out.ended.usage == Usage(input_tokens=12, output_tokens=8)
    assert out.ended.duration_ms == 4.0
    assert {s.step_id: s.attempts for s in out.ended.steps} == {
        "plan": 1,
        "s1": 1,
        "s2": 1,
        "answer": 1,
    }


def test_retryable_failure_fails_over_excluding_the_failed_deployment() -> None:
    pick = Picker()
    out = chains.start(diamond(), "t", T0, pick)
    out = chains.on_failed(
        out.state, failed("plan", dep="dep-a"), T0 + 5, pick, max_attempts=3, due=True
    )
    assert out.dispatch == ["plan"] and out.ended is None
    st = out.state.steps["plan"]
    assert st.attempt == 2 and st.target == target("dep-b") and st.tried == ["dep-a"]
    assert pick.calls[-1] == ("plan", ["dep-a"])


def test_retryable_gives_up_after_max_attempts() -> None:
    pick = Picker(["dep-a", "dep-b", "dep-c"])
    out = chains.start(diamond(), "t", T0, pick)
    out = chains.on_failed(out.state, failed("plan", attempt=1, dep="dep-a"), T0, pick, 2, True)
    assert out.dispatch == ["plan"]
    out = chains.on_failed(out.state, failed("plan", attempt=2, dep="dep-b"), T0, pick, 2, True)
    assert out.dispatch == []
    assert isinstance(out.ended, ChainFailed)
    assert out.state.steps["plan"].status == "failed"
    assert "failed 2 times" in out.ended.reason and "boom 2" in out.ended.reason
    assert out.ended.step_id == "plan"


def test_retryable_with_nowhere_else_retries_same_deployment_after_retry_after() -> None:
    pick = Picker(["dep-a"])
    out = chains.start(diamond(), "t", T0, pick)
    early = chains.on_failed(out.state, failed("plan", retry_after=2.0), T0, pick, 3, due=False)
    assert early.retry_after_s == 2.0 and early.dispatch == [] and early.state is out.state
    later = chains.on_failed(out.state, failed("plan", retry_after=2.0), T0, pick, 3, due=True)
    assert later.dispatch == ["plan"] and later.state.steps["plan"].target == target("dep-a")


def test_fatal_failure_fails_the_chain() -> None:
    pick = Picker()
    out = chains.start(diamond(), "t", T0, pick)
    n_picks = len(pick.calls)
    out = chains.on_failed(out.state, failed("plan", cls="fatal"), T0 + 9, pick, 3, True)
    assert out.dispatch == []
    assert isinstance(out.ended, ChainFailed)
    assert out.state.status == "failed"
    assert "fatal" in out.ended.reason and "'plan'" in out.ended.reason
    assert out.ended.error is not None and out.ended.error.status == 401
    assert len(pick.calls) == n_picks  # no failover attempted


def test_no_deployment_at_start_fails_with_reason() -> None:
    out = chains.start(diamond(), "t", T0, Picker([]))
    assert isinstance(out.ended, ChainFailed)
    assert "no deployment left" in out.ended.reason and out.ended.step_id == "plan"


def test_followups_after_crash_repeat_the_same_dispatches() -> None:
    pick = Picker()
    out = chains.start(diamond(), "t", T0, pick)
    after_plan = chains.on_completed(out.state, completed("plan"), T0 + 1, pick)
    again = chains.followups(after_plan.state, T0 + 2)
    assert sorted(again.dispatch) == sorted(after_plan.dispatch) == ["s1", "s2"]
    assert again.ended is None

    retry = chains.on_failed(after_plan.state, failed("s1", dep="dep-a"), T0 + 2, pick, 3, True)
    assert retry.dispatch == ["s1"]
    assert retry.state.steps["s1"].attempt == 2
    assert sorted(chains.followups(retry.state, T0 + 3).dispatch) == ["s1", "s2"]
    # long after dispatch (past the duplicate window) nothing is re-sent as new work
    late = T0 + chains.REDISPATCH_WINDOW_MS + 10
    assert chains.followups(retry.state, late).dispatch == []


def test_followups_of_an_ended_chain_republish_the_end() -> None:
    pick = Picker()
    out = chains.start(Chain(id="c1", steps=[diamond().steps[0]]), "t", T0, pick)
    out = chains.on_completed(out.state, completed("plan", text="P"), T0 + 1, pick)
    assert isinstance(out.ended, ChainCompleted)
    again = chains.followups(out.state, T0 + 2)
    assert again.dispatch == [] and again.ended == out.ended


def test_cancel_again_repeats_its_effects_and_a_finished_chain_refuses() -> None:
    """A cancel redelivered after a crash between its record and its effects finds the chain
    cancelled: refused (it ended), but with the same effects again to perform (the end, the
    workers' cancel), so `chain.cancelled` surely went out. A completed chain: refused alone."""
    start = chains.start(diamond(), "t", T0, Picker())
    first = control.cancel(start.state, "stop", T0 + 5)
    with pytest.raises(control.ControlError, match="already ended \\(cancelled\\)") as again:
        control.cancel(first.state, "stop", T0 + 9)
    effects = again.value.effects
    assert effects is not None and effects.state is first.state and effects.cancel
    assert effects.ended == first.ended and effects.dispatch == []
    done = chains.on_completed(start.state, completed("plan"), T0 + 1, Picker()).state
    finished = msgspec.structs.replace(done, status="completed", ended_at_ms=T0 + 2)
    with pytest.raises(control.ControlError, match="already ended \\(completed\\)") as refused:
        control.cancel(finished, "stop", T0 + 3)
    assert refused.value.effects is None
