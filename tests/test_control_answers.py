"""The router answers every control message once: `control.accepted` after its transition is
recorded, or `control.rejected`; and a chain failed by its deadline still names the cause."""

from __future__ import annotations

import asyncio
import time

from test_chain_flows import Stack, config
from test_chain_flows import stack as stack  # a fixture, used by name

from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainFailed,
    ControlAccepted,
    ControlRejected,
    Deployment,
    LlmStep,
    Message,
    ToolStep,
    WaitStep,
    event_decoder,
)
from chainyard.ledger import audit

TENANT = "acme"  # the stack's client's tenant


def approval(chain_id: str) -> Chain:
    return Chain(
        id=chain_id,
        steps=[
            ToolStep(id="look", tool="search", args={"query": "x"}),
            WaitStep(id="ok", signal="go", after=["look"]),
        ],
    )


async def answers_in_log(stack: Stack, chain_id: str) -> list[tuple[str, object, str]]:
    """Every control answer of a chain in the event stream: (type, intake_seq, Nats-Msg-Id)."""
    js = stack.bus.js
    subject = f"cy.events.{TENANT}.{chain_id}.control.*"
    sub = await js.subscribe(subject, ordered_consumer=True)
    info = await js.stream_info(stack.bus.topology.events.name, subjects_filter=subject)
    got = []
    for _ in range(sum((info.state.subjects or {}).values())):
        msg = await sub.next_msg(timeout=5)
        ev = event_decoder.decode(msg.data)
        got.append((ev.__struct_config__.tag, ev.intake_seq, (msg.headers or {})["Nats-Msg-Id"]))  # type: ignore[union-attr]
    await sub.unsubscribe()
    return got


async def test_each_control_is_answered_once_with_its_intake_seq(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    client = stack.client
    await client.submit(approval("a1"))
    early = await client.signal("a1", "go", {"ok": True})  # maybe before `ok` is reached
    assert isinstance(early, ControlAccepted) and early.verb == "signal.go"
    assert early.message.startswith("signal 'go' re")  # released 'ok', or recorded for it
    ended = [ev async for ev in client.watch("a1")][-1]
    assert isinstance(ended, ChainCompleted) and ended.output.data == {"ok": True}
    again = await client.signal("a1", "go", "twice")  # the chain has ended
    assert isinstance(again, ControlRejected)
    assert again.message == "chain 'a1' already ended (completed)"
    replayed = await client.replay("a1", "ok", new_id="a1-r", wait=30)
    assert isinstance(replayed, ChainCompleted) and replayed.chain_id == "a1-r"
    # a replay whose new id is another chain's is refused, on the old chain's subjects too
    clash = await client.replay("a1", "ok", new_id="a1", wait=30)
    assert isinstance(clash, ControlRejected)
    assert clash.message == "chain id 'a1' is already used by another chain"

    await client.submit(approval("a2"))
    cancelled = await client.cancel("a2", "changed my mind")
    assert isinstance(cancelled, ControlAccepted) and cancelled.message == "cancelled"
    # accepted once recorded: the chain's end is already in its events
    assert isinstance([ev async for ev in client.watch("a2")][-1], ChainCancelled)

    # one answer per control message, its id deterministic (a redelivery's repeat is dropped)
    logged = await answers_in_log(stack, "a1")
    assert len(logged) == 4, logged
    seqs = [early.intake_seq, again.intake_seq, replayed_seq := logged[2][1], clash.intake_seq]
    assert [(t, s) for t, s, _ in logged] == [
        ("control.accepted", seqs[0]),
        ("control.rejected", seqs[1]),
        ("control.accepted", replayed_seq),
        ("control.rejected", seqs[3]),
    ]
    assert all(s > 0 for s in seqs) and len(set(seqs)) == 4
    assert [i for _, _, i in logged] == [f"{TENANT}.a1.control.{s}" for s in seqs]
    # the ledger counts none of it as a chain's end, a step or a stray event (what it says of
    # wait steps, replays, cancels and id_in_use is its own gap, fixed beside this: not here)
    report = await audit(
        stack.bus.js,
        [(TENANT, "a1"), (TENANT, "a2"), (TENANT, "a1-r")],
        allow_dead_letters=True,  # the refused controls are dead letters, as they should be
    )
    said = report.lost + report.duplicated + report.unexpected
    assert not [line for line in said if "control" in line], said


async def test_replay_of_an_unknown_step_answers_at_once(stack: Stack) -> None:
    stack.start(config(stack.sandbox.url))
    one = Chain(id="r1", steps=[ToolStep(id="look", tool="search", args={"query": "x"})])
    done = await stack.client.run(one, timeout=30)
    assert isinstance(done, ChainCompleted)
    t0 = time.monotonic()
    refused = await stack.client.replay("r1", "nope", wait=300)
    assert time.monotonic() - t0 < 10  # the refusal, not the 300 s wait for an end
    assert isinstance(refused, ControlRejected)
    assert refused.message == "chain 'r1' has no step 'nope'"


async def test_a_deadline_failure_names_the_pools_without_capacity(stack: Stack) -> None:
    """A step that waits for capacity until the deadline: the chain's reason says which pool
    had no live workers, not only that the deadline passed."""
    cfg = config(stack.sandbox.url)
    cfg = cfg.__class__(
        deployments=[*cfg.deployments, Deployment(name="far", pool="far", model="far-model")],
        pools=cfg.pools,
        tools=cfg.tools,
    )
    stack.start(cfg)  # nothing serves pool `far`
    chain = Chain(
        id="d1",
        deadline_ms=1500,
        steps=[
            ToolStep(id="look", tool="search", args={"query": "x"}),
            LlmStep(
                id="answer",
                model="far-model",
                messages=[Message(role="user", content="{{steps.look.output}}")],
            ),
        ],
    )
    ended = await asyncio.wait_for(stack.client.run(chain, timeout=30), 40)
    assert isinstance(ended, ChainFailed), ended
    assert ended.reason.startswith("deadline exceeded")
    assert "no capacity for 'far-model': far: no live workers in pool far" in ended.reason
    report = await audit(stack.bus.js, [(TENANT, "d1")], expect="failed")
    assert (report.lost, report.duplicated, report.unexpected) == ([], [], [])
