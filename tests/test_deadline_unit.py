"""Nothing ends silently, the pure parts: a chain's deadline timer (router/chains.py), the
reason a user reads, tool timeouts (workers/tools.py) and their configuration."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import msgspec
import pytest
from test_chains import T0, Picker, completed, diamond, failed

from chainyard.contracts import (
    Assignment,
    Chain,
    ChainCompleted,
    ChainFailed,
    Config,
    ErrorInfo,
    Replay,
    Target,
    Timer,
    ToolPoolConfig,
    ToolStep,
    Topology,
    WaitStep,
    load_config,
)
from chainyard.router import chains, control
from chainyard.router.policy import NoCapacity
from chainyard.workers.providers._base import ProviderError
from chainyard.workers.tools import Tools, tool_executor

DEADLINE_MS = 5_000


def with_deadline(chain: Chain, ms: int = DEADLINE_MS) -> Chain:
    return msgspec.structs.replace(chain, deadline_ms=ms)


def deadline_timers(out: chains.Outcome) -> list[Timer]:
    return [t for t in out.timers if t.kind == "deadline"]


# -- the deadline timer --------------------------------------------------------------------


def test_start_schedules_the_deadline_timer_once_and_only_with_a_deadline() -> None:
    out = chains.start(with_deadline(diamond()), "t", T0, Picker())
    (timer,) = deadline_timers(out)
    assert (timer.tenant, timer.chain_id, timer.attempt) == ("t", "c1", 0)
    assert timer.due_at_ms == T0 + DEADLINE_MS == out.state.deadline_at_ms
    assert deadline_timers(chains.start(diamond(), "t", T0, Picker())) == []


def test_a_chain_ended_at_creation_gets_no_deadline_timer() -> None:
    out = chains.start(with_deadline(diamond()), "t", T0, Picker([]))  # nowhere to run
    assert isinstance(out.ended, ChainFailed) and deadline_timers(out) == []


def test_followups_resend_the_identical_deadline_timer() -> None:
    """A re-performed creation (or any followup) sends the same timer: the same message id
    (engine: <tenant>.<chain>.<step>.<attempt>.<kind>), so the stream keeps one."""
    pick = Picker()
    first = chains.start(with_deadline(diamond()), "t", T0, pick)
    later = chains.on_completed(first.state, completed("plan"), T0 + 100, pick)
    for state, now in ((first.state, T0 + 1), (later.state, T0 + 200)):
        assert deadline_timers(chains.followups(state, now)) == deadline_timers(first)
    assert deadline_timers(chains.followups(chains.start(diamond(), "t", T0, pick).state, T0)) == []


def test_replay_of_a_chain_with_a_deadline_schedules_its_own() -> None:
    pick = Picker()
    out = chains.start(with_deadline(Chain(id="c1", steps=[diamond().steps[0]])), "t", T0, pick)
    out = chains.on_completed(out.state, completed("plan"), T0 + 1, pick)
    new = control.replay(out.state, Replay(new_id="c2", from_step="plan"), T0 + 50, pick)
    (timer,) = deadline_timers(new)
    assert (timer.chain_id, timer.due_at_ms) == ("c2", T0 + 50 + DEADLINE_MS)


def test_only_a_chain_that_ended_before_its_deadline_has_a_schedule_to_remove() -> None:
    """`deadline_waits`: the router removes the deadline's schedule of such a chain alone."""
    pick = Picker()
    one = Chain(id="c1", steps=[diamond().steps[0]])
    out = chains.start(with_deadline(one), "t", T0, pick)
    assert not chains.deadline_waits(out.state)  # running
    done = chains.on_completed(out.state, completed("plan"), T0 + 1, pick)
    assert isinstance(done.ended, ChainCompleted) and chains.deadline_waits(done.state)
    late = chains.on_deadline(out.state, T0 + DEADLINE_MS)  # the deadline itself ended it
    assert isinstance(late.ended, ChainFailed) and not chains.deadline_waits(late.state)
    plain = chains.on_completed(chains.start(one, "t", T0, pick).state, completed("plan"), T0, pick)
    assert plain.ended is not None and not chains.deadline_waits(plain.state)  # no deadline


def test_deadline_fails_the_chain_naming_unfinished_steps_and_their_last_error() -> None:
    pick = Picker()
    out = chains.start(with_deadline(diamond()), "t", T0, pick)
    out = chains.on_completed(out.state, completed("plan"), T0 + 1, pick)  # s1, s2 dispatched
    out = chains.on_failed(out.state, failed("s1", dep="dep-a"), T0 + 2, pick, 3, True)
    assert out.state.steps["s1"].attempt == 2  # failed over, the 503 kept as its last error
    at = T0 + DEADLINE_MS
    end = chains.on_deadline(out.state, at)
    assert isinstance(end.ended, ChainFailed) and end.cancel and end.dispatch == []
    reason = end.ended.reason
    assert reason.startswith("deadline exceeded (5000 ms); unfinished: ")
    assert "step 's1' dispatched to dep-b (attempt 2, last error: retryable: boom 1)" in reason
    assert "step 's2' dispatched to dep-a (attempt 1)" in reason
    assert "step 'answer' not started" in reason and "'plan'" not in reason
    st = end.state.steps
    assert {sid: s.status for sid, s in st.items()} == {
        "plan": "completed",
        "s1": "cancelled",
        "s2": "cancelled",
        "answer": "cancelled",
    }
    assert st["s1"].error == ErrorInfo(cls="retryable", message="boom 1", status=503)
    assert end.state.status == "failed" and end.state.ended_at_ms == at
    assert end.state.reason == reason
    assert (end.ended.step_id, end.ended.error) == (None, None)  # the reason says it all
    # The terminal event rebuilt from the recorded state is the same: a re-publish is a duplicate.
    assert chains.ended_event(end.state) == end.ended


def test_deadline_names_a_waiting_step_and_a_step_without_capacity() -> None:
    chain = Chain(
        id="c1",
        deadline_ms=DEADLINE_MS,
        steps=[
            WaitStep(id="approve", signal="approval"),
            ToolStep(id="fetch", tool="search", args={}),
        ],
    )

    def no_capacity_yet(step: object, exclude: list[str]) -> Target | str:
        return NoCapacity("all busy")

    out = chains.start(chain, "t", T0, no_capacity_yet)  # type: ignore[arg-type]
    assert out.state.steps["fetch"].status == "pending"
    end = chains.on_deadline(out.state, T0 + DEADLINE_MS)
    assert isinstance(end.ended, ChainFailed)
    assert "step 'approve' waiting for signal 'approval'" in end.ended.reason
    # the reason it waited, not only that it did not start
    assert "step 'fetch' not started: all busy" in end.ended.reason
    assert {s.step_id: s.status for s in end.ended.steps} == {
        "approve": "cancelled",
        "fetch": "cancelled",
    }


def test_a_step_due_after_the_deadline_names_why_it_waited() -> None:
    """A capacity recheck past the deadline ends the chain with the cause of the wait (which
    pools had no live workers), as the deadline timer does."""
    chain = Chain(id="c1", deadline_ms=DEADLINE_MS, steps=[ToolStep(id="fetch", tool="s")])
    why = "no capacity for 'small': local: no live workers in pool local"

    def no_capacity(step: object, exclude: list[str]) -> Target | str:
        return NoCapacity(why)

    out = chains.start(chain, "t", T0, no_capacity)  # type: ignore[arg-type]
    assert out.state.steps["fetch"].error == ErrorInfo(cls="retryable", message=why)
    assert why in msgspec.json.encode(out.state).decode()  # recorded as it is (KV)
    late = chains._advance(out.state, T0 + DEADLINE_MS + 1, no_capacity, [])  # type: ignore[arg-type]
    assert isinstance(late.ended, ChainFailed)
    assert late.ended.reason == (
        f"deadline exceeded before the next step could start: step 'fetch': {why}"
    )
    assert late.ended.steps[0].error is None  # a capacity wait is not a step failure

    def placed(step: object, exclude: list[str]) -> Target | str:
        return Target(deployment="d", pool="p", provider="openai", model="m")

    # capacity came back in time: dispatched, and the wait's reason is gone
    on_time = chains._advance(out.state, T0 + 10, placed, [])  # type: ignore[arg-type]
    assert on_time.dispatch == ["fetch"] and on_time.state.steps["fetch"].error is None


def test_deadline_again_changes_nothing_and_repeats_the_end_and_the_cancel() -> None:
    out = chains.start(with_deadline(diamond()), "t", T0, Picker())
    end = chains.on_deadline(out.state, T0 + DEADLINE_MS)
    again = chains.on_deadline(end.state, T0 + DEADLINE_MS + 30_000)
    assert again.state is end.state  # no compare-and-set
    assert again.ended == end.ended and again.cancel
    assert again.dispatch == [] and again.timers == []


def test_deadline_after_the_chain_completed_only_republishes_its_end() -> None:
    pick = Picker()
    out = chains.start(with_deadline(Chain(id="c1", steps=[diamond().steps[0]])), "t", T0, pick)
    out = chains.on_completed(out.state, completed("plan"), T0 + 1, pick)
    late = chains.on_deadline(out.state, T0 + DEADLINE_MS)
    assert late.state is out.state and isinstance(late.ended, ChainCompleted)
    assert not late.cancel


def test_deadline_not_yet_due_by_this_clock_comes_back() -> None:
    out = chains.start(with_deadline(diamond()), "t", T0, Picker())
    early = chains.on_deadline(out.state, T0 + DEADLINE_MS - 250)
    assert early.state is out.state and early.ended is None
    assert early.retry_after_s == 0.25


def test_a_tool_timeout_is_not_called_a_deadline() -> None:
    pick = Picker()
    chain = Chain(id="c1", deadline_ms=DEADLINE_MS, steps=[diamond().steps[0]])
    out = chains.start(chain, "t", T0, pick)
    own = chains.on_failed(out.state, failed("plan", cls="timeout"), T0 + 10, pick, 3, True)
    assert isinstance(own.ended, ChainFailed)
    assert own.ended.reason == "step 'plan' on dep-a timed out: boom 1"
    late = chains.on_failed(
        out.state, failed("plan", cls="timeout"), T0 + DEADLINE_MS, pick, 3, True
    )
    assert isinstance(late.ended, ChainFailed)
    assert late.ended.reason.startswith("deadline exceeded: step 'plan'")


# -- tool timeouts -------------------------------------------------------------------------


def test_tool_pool_timeout_defaults_to_60_s_and_is_set_per_tool(tmp_path: Path) -> None:
    assert Config().tool_pool("search").timeout_s == 60.0
    path = tmp_path / "c.toml"
    path.write_text('tools = ["slow"]\n[[tool_pools]]\nname = "slow"\ntimeout_s = 2.5\n')
    cfg = load_config(path)
    assert cfg.tool_pool("slow") == ToolPoolConfig(name="slow", timeout_s=2.5)
    assert cfg.tool_pool("other").timeout_s == 60.0
    path.write_text('[[tool_pools]]\nname = "slow"\ntimeout_s = 0\n')
    with pytest.raises(ValueError, match="timeout_s"):
        load_config(path)


def test_pool_consumers_have_no_server_limit_and_workers_a_bound() -> None:
    topo = Topology()
    assert topo.pool_consumer("sim").max_deliver == -1
    assert topo.work_max_deliver == 5


def _assignment(tool: str, deadline_at_ms: int | None = None) -> Assignment:
    return Assignment(
        chain_id="c1",
        step_id="s",
        attempt=1,
        tenant="t",
        step=ToolStep(id="s", tool=tool, args={}),
        target=Target(deployment=f"tool.{tool}", pool=f"tool.{tool}", provider="tool", model=tool),
        dispatched_at_ms=int(time.time() * 1000),
        deadline_at_ms=deadline_at_ms,
    )


async def test_a_tool_past_its_timeout_fails_with_class_timeout() -> None:
    tools = Tools()
    release = threading.Event()

    @tools.tool
    async def stuck() -> str:
        await asyncio.Event().wait()
        return "never"

    @tools.tool
    def blocking() -> str:
        release.wait(10)
        return "late"

    try:
        for name in ("stuck", "blocking"):
            run = tool_executor(tools.by_name[name], timeout_s=0.05)
            with pytest.raises(ProviderError) as ei:
                await asyncio.wait_for(run(_assignment(name)), 5)
            assert ei.value.cls == "timeout"
            assert ei.value.message == f"tool {name!r} did not return within 0.05 s"
    finally:
        release.set()  # the sync tool's thread cannot be stopped: let it end


async def test_a_tool_stops_at_the_chains_deadline_when_that_comes_first() -> None:
    tools = Tools()

    @tools.tool
    async def stuck() -> str:
        await asyncio.Event().wait()
        return "never"

    run = tool_executor(tools.by_name["stuck"], timeout_s=60)
    soon = int(time.time() * 1000) + 50
    with pytest.raises(ProviderError) as ei:
        await asyncio.wait_for(run(_assignment("stuck", soon)), 5)
    assert (ei.value.cls, ei.value.message) == (
        "timeout",
        "the step's deadline passed during the call",
    )


async def test_a_tool_raising_timeout_error_itself_is_fatal_not_timed_out() -> None:
    tools = Tools()

    @tools.tool
    async def flaky() -> str:
        raise TimeoutError("upstream")

    with pytest.raises(ProviderError) as ei:
        await tool_executor(tools.by_name["flaky"], timeout_s=60)(_assignment("flaky"))
    assert ei.value.cls == "fatal" and "TimeoutError: upstream" in ei.value.message
