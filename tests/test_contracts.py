"""Wire contracts: round trips, strict intake, tolerant events, the checked-in schemas."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from chainyard.contracts import (
    Assignment,
    Chain,
    ChainCompleted,
    LlmStep,
    Message,
    Output,
    Params,
    Route,
    StepCompleted,
    Target,
    ToolStep,
    Topology,
    ValidationError,
    chain_decoder,
    chain_digest,
    encode,
    event_decoder,
    schema_export,
)


def sample_chain() -> Chain:
    return Chain(
        id="c-1",
        steps=[
            LlmStep(
                id="plan",
                model="m",
                messages=[
                    Message(role="system", content="be brief"),
                    Message(role="user", content="hi"),
                ],
                params=Params(max_tokens=10, temperature=0.2),
                route=Route(strategy="cheapest", prefer=["a"]),
            ),
            ToolStep(id="search", tool="search", args={"q": "{{steps.plan.output}}", "n": 2}),
        ],
        output="search",
        budget_usd=0.5,
        metadata={"k": "v"},
    )


def test_chain_round_trip_with_both_step_kinds() -> None:
    chain = sample_chain()
    data = encode(chain)
    raw = json.loads(data)
    assert [s["kind"] for s in raw["steps"]] == ["llm", "tool"]
    back = chain_decoder.decode(data)
    assert back == chain
    assert isinstance(back.steps[0], LlmStep) and isinstance(back.steps[1], ToolStep)
    assert back.step("search").args == {"q": "{{steps.plan.output}}", "n": 2}
    assert back.output_step == "search"


def test_minimal_chain_from_json_gets_defaults() -> None:
    chain = chain_decoder.decode(
        b'{"id": "x", "steps": [{"kind": "tool", "id": "t", "tool": "weather",'
        b' "args": {"city": "Oslo"}}]}'
    )
    assert chain.v == 1 and chain.priority == 5 and chain.output_step == "t"


def test_unknown_field_rejected_with_path() -> None:
    raw = json.loads(encode(sample_chain()))
    raw["steps"][1]["colour"] = "red"
    with pytest.raises(ValidationError) as e:
        chain_decoder.decode(json.dumps(raw))
    assert "unknown field `colour`" in str(e.value)
    assert "$.steps[1]" in str(e.value)


@pytest.mark.parametrize("bad", ["has space", "dots.in.id", "", "x" * 65, "star*"])
def test_bad_step_id_rejected(bad: str) -> None:
    raw = json.loads(encode(sample_chain()))
    raw["steps"][0]["id"] = bad
    with pytest.raises(ValidationError) as e:
        chain_decoder.decode(json.dumps(raw))
    assert "$.steps[0].id" in str(e.value)


def test_unknown_step_kind_rejected() -> None:
    with pytest.raises(ValidationError) as e:
        chain_decoder.decode(b'{"id": "x", "steps": [{"kind": "shell", "id": "a"}]}')
    assert "$.steps[0]" in str(e.value)


def test_events_tolerate_unknown_fields() -> None:
    target = Target(deployment="d", pool="p", provider="openai", model="m")
    ev = StepCompleted(
        chain_id="c",
        step_id="s",
        attempt=1,
        tenant="t",
        output=Output(text="hi"),
        target=target,
        worker="w",
        dispatched_at_ms=1,
        started_at_ms=2,
        latency_ms=3.0,
    )
    raw = json.loads(encode(ev))
    raw["from_the_future"] = {"x": 1}
    raw["target"]["region"] = "eu"
    raw["output"]["logprobs"] = [0.1]
    back = event_decoder.decode(json.dumps(raw))
    assert back == ev
    completed = event_decoder.decode(
        b'{"type": "chain.completed", "chain_id": "c", "tenant": "t",'
        b' "output": {"text": "x"}, "new": 1}'
    )
    assert isinstance(completed, ChainCompleted) and completed.output.text == "x"


def test_assignment_msg_id() -> None:
    a = Assignment(
        chain_id="c9",
        step_id="plan",
        attempt=3,
        tenant="t",
        step=sample_chain().steps[0],
        target=Target(deployment="d", pool="p", provider="openai", model="m"),
        dispatched_at_ms=0,
    )
    assert a.msg_id == "t.c9.plan.3"  # the tenant is in every identity


def test_checked_in_schemas_match_the_contracts() -> None:
    rendered = schema_export.render()
    on_disk = {p.name: p.read_text() for p in schema_export.SCHEMA_DIR.glob("*.json")}
    assert set(rendered) == set(on_disk), "schema files added or removed: run `chainyard schema`"
    for name, text in rendered.items():
        assert text == on_disk[name], f"contracts/schema/{name} is stale: run `chainyard schema`"


@pytest.mark.parametrize("name", sorted(schema_export.render()))
def test_schema_is_valid_json_schema(name: str) -> None:
    Draft202012Validator.check_schema(json.loads(schema_export.render()[name]))


def test_sample_chain_validates_against_chain_schema() -> None:
    schema = json.loads((schema_export.SCHEMA_DIR / "chain.json").read_text())
    v = Draft202012Validator(schema)
    assert list(v.iter_errors(json.loads(encode(sample_chain())))) == []
    bad = json.loads(encode(sample_chain()))
    bad["steps"][0]["id"] = "no spaces allowed"
    assert list(v.iter_errors(bad)), "the schema must reject what the decoder rejects"


def test_deadlines_have_a_consumer_apart_from_the_other_timers() -> None:
    """A deadline waits unacknowledged until due; on its own consumer a backlog of deadlines
    never holds back capacity, hedge and wait timers (work-queue filters must not overlap)."""
    topo = Topology()
    deadlines, timers = topo.deadlines_consumer, topo.timers_consumer
    assert topo.subjects.deadline("t", "c") == "cy.deadline.t.c"
    assert {deadlines.filter_subject, timers.filter_subject} <= set(topo.timers.subjects)
    assert not deadlines.filter_subject.startswith(timers.filter_subject.rstrip(">"))
    assert deadlines.max_ack_pending > timers.max_ack_pending


def test_chain_digest_is_of_the_bytes_sent_trimmed() -> None:
    """What a client in any language can compute: the same file with or without its last
    newline is one chain; any other byte makes it another."""
    data = encode(sample_chain())
    assert chain_digest(data) == chain_digest(b"  " + data + b"\n")
    assert chain_digest(data) != chain_digest(data.replace(b'"id"', b' "id"', 1))
    assert len(chain_digest(data)) == 32 and int(chain_digest(data), 16) >= 0
