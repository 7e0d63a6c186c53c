"""Chains end to end on a real nats-server: agent loops, waits, cancel, replay, crash recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainFailed,
    Config,
    ControlRejected,
    Deployment,
    LlmStep,
    Loop,
    Message,
    PoolConfig,
    StepCompleted,
    StepOverride,
    ToolStep,
    WaitStep,
    dump_config,
    event_decoder,
    state_decoder,
)
from chainyard.ledger import check, collect
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.stack import Services, build
from chainyard.workers.tools import Tools

calls: Counter[str] = Counter()
tools = Tools()


@tools.tool
def weather(city: str) -> dict[str, object]:
    """Forecast for a city."""
    calls[f"weather:{city}"] += 1
    return {"city": city, "temp_c": 17 if city == "Lisbon" else 3}


@tools.tool
def search(query: str) -> list[str]:
    """Search the web."""
    calls[f"search:{query}"] += 1
    return [f"result for {query}"]


@tools.tool
def explode(why: str) -> str:
    """Always fails."""
    raise RuntimeError(why)


def config(sandbox_url: str, **kw: object) -> Config:
    return Config(
        deployments=[
            Deployment(name="sim-a", pool="sim-a", model="gpt-4o-mini", capabilities=["tools"]),
            Deployment(name="sim-b", pool="sim-b", model="gpt-4o", capabilities=["tools"]),
        ],
        groups={"any": ["sim-a", "sim-b"]},
        pools=[
            PoolConfig(name="sim-a", base_url=sandbox_url + "/v1"),
            PoolConfig(name="sim-b", base_url=sandbox_url + "/v1"),
        ],
        tools=[t.name for t in tools],
        **kw,  # type: ignore[arg-type]
    )


class Stack:
    def __init__(
        self, server: NatsServer, sandbox: SandboxServer, bus: Bus, client: Client
    ) -> None:
        self.server, self.sandbox, self.bus, self.client = server, sandbox, bus, client
        self.services: list[Services] = []

    def start(
        self,
        cfg: Config,
        *,
        router: bool = True,
        pools: list[str] | None = None,
        with_tools: bool = True,
    ) -> Services:
        s = build(self.bus, cfg, router=router, pools=pools, tools=tools if with_tools else None)
        s.start()
        self.services.append(s)
        return s


@pytest.fixture
async def stack(nats_server: NatsServer) -> AsyncIterator[Stack]:
    calls.clear()
    async with SandboxServer(SandboxConfig(latency_ms=5)) as sandbox:
        bus = await open_bus(nats_server.url, name="flows")
        st = Stack(nats_server, sandbox, bus, Client(bus.nc, "acme", bus.topology))
        try:
            yield st
            await audit_clean(bus)
        finally:
            for s in st.services:
                await s.shutdown()
            await bus.close()


async def audit_clean(bus: Bus) -> None:
    """After each flow: the ledger, offered to users for every chain feature (waits, signals,
    cancels, replays, agent loops, conditions), reports the run clean. Every chain with state
    counts as accepted, with the end its state records."""
    snap = await collect(bus.js, bus.topology)
    expect = {key: state.status for key, state in snap.states.items()}
    r = check(snap, expect, expect=expect, allow_dead_letters=True)
    assert (r.lost, r.duplicated, r.unexpected) == ([], [], []), r.details()


def ask(content: str) -> list[Message]:
    return [Message(role="user", content=content)]


def agent_chain(chain_id: str, prompt: str, loop: Loop) -> Chain:
    """One agent step (`agent`) on gpt-4o-mini, asked `prompt`, calling tools in `loop`."""
    step = LlmStep(id="agent", model="gpt-4o-mini", messages=ask(prompt), loop=loop)
    return Chain(id=chain_id, steps=[step])


async def test_fan_out_and_fan_in(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(
        id="fan",
        steps=[
            LlmStep(id="plan", model="gpt-4o-mini", messages=ask("plan")),
            ToolStep(id="w1", tool="weather", args={"city": "Lisbon"}, after=["plan"]),
            ToolStep(id="w2", tool="weather", args={"city": "Oslo"}, after=["plan"]),
            ToolStep(id="s", tool="search", args={"query": "{{steps.w1.output.city}}"}),
            LlmStep(
                id="answer",
                model="gpt-4o-mini",
                messages=ask(
                    "{{steps.w1.output.temp_c}} {{steps.w2.output.temp_c}} {{steps.s.output.0}}"
                ),
            ),
        ],
    )
    ended = await stack.client.run(chain, timeout=30)
    assert isinstance(ended, ChainCompleted), ended
    assert ended.output.text == "echo: 17 3 result for Lisbon"
    assert calls == {"weather:Lisbon": 1, "weather:Oslo": 1, "search:Lisbon": 1}


async def test_branch_skipped_by_condition(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(
        id="branch",
        steps=[
            ToolStep(id="w", tool="weather", args={"city": "Oslo"}),
            ToolStep(
                id="warm",
                tool="search",
                args={"query": "beach"},
                when="steps.w.output.temp_c == 17",
            ),
            ToolStep(id="after_warm", tool="search", args={"query": "{{steps.warm.output}}"}),
            ToolStep(
                id="cold", tool="search", args={"query": "skis"}, when="steps.w.output.temp_c != 17"
            ),
        ],
        output="cold",
    )
    ended = await stack.client.run(chain, timeout=30)
    assert isinstance(ended, ChainCompleted), ended
    status = {s.step_id: s.status for s in ended.steps}
    assert status == {
        "w": "completed",
        "warm": "skipped",
        "after_warm": "skipped",
        "cold": "completed",
    }
    assert calls == {"weather:Oslo": 1, "search:skis": 1}


async def test_agent_loop_calls_tools_and_answers(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    prompt = 'call weather {"city": "Lisbon"} and call search {"query": "bike lanes"}'
    chain = agent_chain("agent", prompt, Loop(tools=["weather", "search"]))
    ended = await stack.client.run(chain, timeout=30)
    assert isinstance(ended, ChainCompleted), ended
    assert calls == {"weather:Lisbon": 1, "search:bike lanes": 1}
    ran = {s.step_id: s.status for s in ended.steps if s.step_id.startswith("agent--")}
    assert ran == {"agent--1-0": "completed", "agent--1-1": "completed"}
    # The model's second call carried both results, each with its call id; it echoed the last.
    body = stack.sandbox.last("openai.chat").body
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "tool", "tool"]
    assert [m["tool_call_id"] for m in body["messages"][2:]] == [
        c["id"] for c in body["messages"][1]["tool_calls"]
    ]
    assert {t["function"]["name"] for t in body["tools"]} == {"weather", "search"}
    assert ended.output.text == 'echo: ["result for bike lanes"]'


async def test_agent_loop_limit_ends_the_chain_clearly(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    # The first answer's tokens already exceed max_tokens: the loop stops before any tool runs.
    chain = agent_chain(
        "looplimit", 'call weather {"city": "Oslo"}', Loop(tools=["weather"], max_tokens=3)
    )
    ended = await stack.client.run(chain, timeout=30)
    assert isinstance(ended, ChainFailed)
    assert "agent loop 'agent' stopped at max_tokens=3" in ended.reason
    assert calls == {}


async def test_agent_loop_last_iteration_must_answer(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = agent_chain(
        "lastcall", 'call weather {"city": "Oslo"}', Loop(tools=["weather"], max_iterations=1)
    )
    ended = await stack.client.run(chain, timeout=30)
    assert isinstance(ended, ChainCompleted), ended
    assert "tools" not in stack.sandbox.last("openai.chat").body  # nothing left to call
    assert calls == {}


async def test_agent_loop_tool_error_goes_back_to_the_model(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = agent_chain("looperr", 'call explode {"why": "no fuel"}', Loop(tools=["explode"]))
    ended = await stack.client.run(chain, timeout=30)
    assert isinstance(ended, ChainCompleted), ended
    assert "no fuel" in ended.output.text  # the model was told


async def test_wait_released_by_signal(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(
        id="approve",
        steps=[
            WaitStep(id="ok", signal="approval", timeout_ms=30_000),
            ToolStep(id="w", tool="weather", args={"city": "{{steps.ok.output.city}}"}),
        ],
    )
    await stack.client.submit(chain)
    events = stack.client.watch("approve")
    await stack.client.signal("approve", "approval", {"city": "Lisbon"})
    ended = [ev async for ev in events][-1]
    assert isinstance(ended, ChainCompleted), ended
    assert ended.output.data == {"city": "Lisbon", "temp_c": 17}


async def test_signal_before_the_wait_is_kept(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(
        id="early",
        steps=[
            ToolStep(id="first", tool="search", args={"query": "x"}),
            WaitStep(id="ok", signal="go", after=["first"]),
        ],
    )
    # Sent before the chain exists: the router waits a few seconds for the chain to be created
    # (its intake may be in flight), records the signal, and the wait step finds it later.
    # (timeout=None: only send it; waiting for the router's answer would wait for the chain)
    assert await stack.client.signal("early", "go", "now", timeout=None) is None
    chain_id = await stack.client.submit(chain)
    ended = [ev async for ev in stack.client.watch(chain_id)][-1]
    assert isinstance(ended, ChainCompleted), ended
    assert ended.output.data == "now"


async def test_wait_times_out(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(id="late", steps=[WaitStep(id="ok", signal="approval", timeout_ms=300)])
    ended = await stack.client.run(chain, timeout=30)
    assert isinstance(ended, ChainFailed)
    assert ended.error is not None and ended.error.cls == "timeout"
    assert "no signal 'approval' within 300 ms" in ended.reason


async def test_cancel_ends_chain_cancelled(stack: Stack) -> None:
    await stack.sandbox.configure(latency_ms=2000)
    stack.start(config(stack.sandbox.url))
    chain = Chain(
        id="stopme",
        steps=[
            LlmStep(id="slow", model="gpt-4o-mini", messages=ask("take your time")),
            ToolStep(id="next", tool="search", args={"query": "{{steps.slow.output}}"}),
        ],
    )

    async def cancel_once_called() -> None:
        await stack.sandbox.wait_requests(1, "openai.chat")
        await stack.client.cancel("stopme", "user pressed stop")

    task = asyncio.create_task(cancel_once_called())
    ended = await stack.client.run(chain, timeout=30)
    await task
    assert isinstance(ended, ChainCancelled), ended
    assert ended.reason == "user pressed stop"
    assert {s.step_id: s.status for s in ended.steps} == {"slow": "cancelled", "next": "cancelled"}
    assert calls == {}  # the next step never ran
    # Cancelling again is refused with a reason, and changes nothing.
    again = await stack.client.cancel("stopme")
    assert isinstance(again, ControlRejected) and "already ended (cancelled)" in again.message
    state = state_decoder.decode((await stack.bus.chains.get("acme.stopme")).value)
    assert state.status == "cancelled" and state.reason == "user pressed stop"


async def test_replay_with_another_model(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(
        id="orig",
        steps=[
            ToolStep(id="w", tool="weather", args={"city": "Lisbon"}),
            LlmStep(
                id="answer", model="gpt-4o-mini", messages=ask("{{steps.w.output.temp_c}} degrees")
            ),
        ],
    )
    first = await stack.client.run(chain, timeout=30)
    assert isinstance(first, ChainCompleted)
    again = await stack.client.replay(
        "orig", "answer", {"answer": StepOverride(model="gpt-4o")}, new_id="orig-r1", wait=30
    )
    assert isinstance(again, ChainCompleted), again
    assert again.output.text == first.output.text == "echo: 17 degrees"
    by_step = {s.step_id: s for s in again.steps}
    assert by_step["answer"].model == "gpt-4o" and by_step["answer"].pool == "sim-b"
    assert by_step["w"].cost_usd == 0.0
    assert calls == {"weather:Lisbon": 1}  # the tool's output was reused, not run again
    state = msgspec.json.decode((await stack.bus.chains.get("acme.orig-r1")).value)
    assert state["chain"]["replay_of"] == "orig"


async def test_same_chain_submitted_twice_is_accepted_once(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(id="twice", steps=[ToolStep(id="w", tool="weather", args={"city": "Oslo"})])
    completed = []

    async def on(msg: object) -> None:
        completed.append(msg)

    sub = await stack.bus.nc.subscribe("cy.events.acme.twice.chain.completed", cb=on)
    first = await stack.client.run(chain, timeout=30)
    # The second submission is a duplicate: the client gets the first run's result back.
    second = await stack.client.run(chain, timeout=30)
    assert isinstance(first, ChainCompleted)
    assert second == first
    await sub.unsubscribe()
    assert calls == {"weather:Oslo": 1}
    assert len(completed) == 1


ROUTER = [sys.executable, "-m", "chainyard.cli", "router"]


async def _start_router(url: str, cfg_path: Path, fault: str | None) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env.pop("CHAINYARD_FAULT", None)
    if fault:
        env["CHAINYARD_FAULT"] = fault
    return await asyncio.create_subprocess_exec(
        *ROUTER, "--nats", url, "--config", str(cfg_path), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def test_router_killed_between_record_and_emit(stack: Stack, tmp_path: Path) -> None:
    cfg = config(stack.sandbox.url)
    cfg_path = tmp_path / "chainyard.toml"
    cfg_path.write_bytes(dump_config(cfg))
    stack.start(cfg, router=False)  # workers in this process; routers are separate processes
    completions: Counter[str] = Counter()

    async def on(msg: object) -> None:
        ev = event_decoder.decode(msg.data)  # type: ignore[attr-defined]
        if isinstance(ev, StepCompleted):
            completions[ev.step_id] += 1

    sub = await stack.bus.nc.subscribe("cy.events.acme.crash.step.completed", cb=on)
    # The 2nd recorded transition is step "a" completing: the router dies after writing it and
    # before emitting "b" and "c".
    first = await _start_router(stack.server.url, cfg_path, "after_record:2")
    second = None
    try:
        chain = Chain(
            id="crash",
            steps=[
                ToolStep(id="a", tool="weather", args={"city": "Lisbon"}),
                ToolStep(id="b", tool="search", args={"query": "{{steps.a.output.city}}"}),
                ToolStep(id="c", tool="weather", args={"city": "Oslo"}, after=["a"]),
                LlmStep(id="d", model="gpt-4o-mini", messages=ask("{{steps.b.output.0}}")),
            ],
        )
        await stack.client.submit(chain)
        assert await asyncio.wait_for(first.wait(), 30) == 137
        second = await _start_router(stack.server.url, cfg_path, None)
        ended = [ev async for ev in stack.client.watch("crash")][-1]
        assert isinstance(ended, ChainCompleted), ended
        assert ended.output.text == "echo: result for Lisbon"
        assert calls == {"weather:Lisbon": 1, "search:Lisbon": 1, "weather:Oslo": 1}
        assert completions == {"a": 1, "b": 1, "c": 1, "d": 1}
    finally:
        await sub.unsubscribe()
        for p in (first, second):
            if p is not None and p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await asyncio.wait_for(p.wait(), 20)


async def test_status_lists_chains_in_flight(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    chain = Chain(
        id="inflight",
        steps=[
            ToolStep(id="a", tool="search", args={"query": "x"}),
            WaitStep(id="ok", signal="go", after=["a"]),
        ],
    )
    events = stack.client.watch("inflight")
    await stack.client.submit(chain)
    async for ev in events:  # wait until the tool step is recorded
        if isinstance(ev, StepCompleted):
            break
    rows = []
    for _ in range(100):  # the router records the step right after publishing its event
        rows = await stack.client.status()
        if rows and rows[0].done == 1:
            break
        await asyncio.sleep(0.02)
    assert [(r.chain_id, r.steps, r.done, r.total) for r in rows] == [
        ("inflight", {"ok": "-"}, 1, 2)
    ]
    await stack.client.signal("inflight", "go")
    ended = [ev async for ev in stack.client.watch("inflight")][-1]
    assert isinstance(ended, ChainCompleted)
    assert await stack.client.status() == []


async def test_cli_control_verbs(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    await stack.client.submit(Chain(id="clichain", steps=[WaitStep(id="ok", signal="approve")]))
    env = {**os.environ, "CHAINYARD_NATS": stack.server.url, "CHAINYARD_TENANT": "acme"}

    async def cli(*args: str) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainyard.cli", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(p.communicate(), 60)
        return p.returncode or 0, out.decode()

    code, out = await cli("signal", "clichain", "approve", "--data", '{"ok": true}')
    assert code == 0 and "approve" in out
    code, out = await cli("watch", "clichain")
    assert code == 0
    assert event_decoder.decode(out.strip().splitlines()[-1]).output.data == {"ok": True}  # type: ignore[union-attr]
    # A replay keeps the signals the chain received: the wait step is released at once.
    code, out = await cli("replay", "clichain", "ok", "--wait")
    assert code == 0, out
    assert event_decoder.decode(out).output.data == {"ok": True}  # type: ignore[union-attr]
    await stack.client.submit(Chain(id="clicancel", steps=[WaitStep(id="ok", signal="never")]))
    code, out = await cli("cancel", "clicancel", "--reason", "no longer needed")
    assert code == 0
    ended = [ev async for ev in stack.client.watch("clicancel")][-1]
    assert isinstance(ended, ChainCancelled) and ended.reason == "no longer needed"


WORKER = [sys.executable, "-m", "chainyard.cli", "worker"]


async def test_redelivered_step_with_recorded_result_is_not_called_again(
    stack: Stack, tmp_path: Path
) -> None:
    """A worker dies after its result is stored but before it acks the work: the redelivery
    finds the result recorded and does not call the provider a second time."""
    cfg = config(stack.sandbox.url, work_ack_wait_s=1.0)
    cfg_path = tmp_path / "chainyard.toml"
    cfg_path.write_bytes(dump_config(cfg))
    stack.start(cfg, pools=[])  # the router and the tools here; LLM workers as processes
    env = {k: v for k, v in os.environ.items() if k != "CHAINYARD_FAULT"}
    args = [*WORKER, "--nats", stack.server.url, "--config", str(cfg_path), "--pool", "sim-a"]
    dying = await asyncio.create_subprocess_exec(
        *args, env={**env, "CHAINYARD_FAULT": "after_publish:1"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    survivor = None
    try:
        chain = Chain(
            id="once", steps=[LlmStep(id="a", model="gpt-4o-mini", messages=ask("hello"))]
        )
        ended = await stack.client.run(chain, timeout=60)  # recorded before the worker died
        assert isinstance(ended, ChainCompleted), ended
        assert await asyncio.wait_for(dying.wait(), 30) == 137
        info = await stack.bus.js.consumer_info("CY_WORK", "pool-sim-a")
        assert info.num_ack_pending + info.num_pending == 1  # the work was never acked
        survivor = await asyncio.create_subprocess_exec(
            *args, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        for _ in range(600):  # the survivor gets it after the ack wait, and acks it
            info = await stack.bus.js.consumer_info("CY_WORK", "pool-sim-a")
            if info.num_ack_pending + info.num_pending == 0:
                break
            await asyncio.sleep(0.05)
        assert info.num_ack_pending + info.num_pending == 0
        assert info.delivered.consumer_seq == 2  # the same message, delivered a second time
        assert stack.sandbox.counts["openai.chat"] == 1  # called once, not twice
    finally:
        for p in (dying, survivor):
            if p is not None and p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await asyncio.wait_for(p.wait(), 20)


async def test_control_for_a_chain_that_never_comes_is_refused(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    refused: asyncio.Future[ControlRejected] = asyncio.get_running_loop().create_future()

    async def on(msg: object) -> None:
        ev = event_decoder.decode(msg.data)  # type: ignore[attr-defined]
        if isinstance(ev, ControlRejected) and not refused.done():
            refused.set_result(ev)

    sub = await stack.bus.nc.subscribe("cy.events.acme.ghost.control.rejected", cb=on)
    await stack.client.signal("ghost", "go")
    ev = await asyncio.wait_for(refused, 30)  # after the router has waited for it a few seconds
    await sub.unsubscribe()
    assert (ev.verb, ev.message) == ("signal.go", "no such chain")
