"""Pure graph logic: dependencies, validation, references, conditions, readiness and skipping."""

from __future__ import annotations

from typing import Any

import pytest

from chainyard.contracts import Chain, LlmStep, Message, Output, StepState, ToolStep
from chainyard.router import graph


def llm(sid: str, content: str = "hi", **kw: Any) -> LlmStep:
    return LlmStep(id=sid, model="m", messages=[Message(role="user", content=content)], **kw)


def tool(sid: str, args: dict[str, Any] | None = None, **kw: Any) -> ToolStep:
    return ToolStep(id=sid, tool="t", args=args or {}, **kw)


def done(text: str = "", data: Any = None) -> StepState:
    return StepState(status="completed", attempt=1, output=Output(text=text, data=data))


def test_dependencies_from_refs_after_and_when() -> None:
    s = llm(
        "d",
        "use {{steps.a.output}} and {{ steps.b.output.hits.0 }}",
        after=["c"],
        when="steps.e.output contains 'yes'",
    )
    assert graph.dependencies(s) == {"a", "b", "c", "e"}
    t = tool("t", {"q": "{{steps.x.output}}", "nested": {"list": ["{{steps.y.output.k}}"]}})
    assert graph.dependencies(t) == {"x", "y"}
    assert graph.dependencies(llm("r", "no refs here {{ not a ref }}")) == set()


def test_validate_accepts_a_good_graph() -> None:
    chain = Chain(
        id="c", steps=[llm("a"), tool("b", {"q": "{{steps.a.output}}"}), llm("c", after=["a", "b"])]
    )
    assert graph.validate(chain) == []


def test_validate_finds_a_cycle() -> None:
    chain = Chain(
        id="c", steps=[llm("a", "{{steps.c.output}}"), llm("b", after=["a"]), llm("c", after=["b"])]
    )
    errors = graph.validate(chain)
    assert len(errors) == 1
    assert errors[0].path == "$.steps"
    assert "cycle" in errors[0].message and "a" in errors[0].message and "c" in errors[0].message


def test_validate_finds_unknown_and_self_refs_and_duplicates() -> None:
    chain = Chain(
        id="c",
        steps=[llm("a", "{{steps.ghost.output}}"), llm("b", after=["b"]), llm("a")],
        output="nowhere",
    )
    by_path = {(e.path, e.message) for e in graph.validate(chain)}
    assert ("$.steps[2].id", "duplicate step id 'a'") in by_path
    assert any(p == "$.steps[0]" and "unknown step 'ghost'" in m for p, m in by_path)
    assert any(p == "$.steps[1]" and "itself" in m for p, m in by_path)
    assert any(p == "$.output" and "nowhere" in m for p, m in by_path)


def test_validate_reports_unparsable_condition() -> None:
    chain = Chain(id="c", steps=[llm("a"), llm("b", when="steps.a.output is big")])
    errors = graph.validate(chain)
    assert [e.path for e in errors] == ["$.steps[1].when"]


def test_resolve_text_and_nested_paths() -> None:
    states = {"a": done("plan text"), "b": done(data={"hits": ["h0", "h1"], "n": 2})}
    s = graph.resolve(
        llm("c", "A={{steps.a.output}} B={{steps.b.output.hits.1}} N={{steps.b.output.n}}"), states
    )
    assert isinstance(s, LlmStep)
    assert s.messages[0].content == "A=plan text B=h1 N=2"
    # data without text is referenced as JSON text
    s2 = graph.resolve(llm("d", "all: {{steps.b.output}}"), states)
    assert s2.messages[0].content == 'all: {"hits": ["h0", "h1"], "n": 2}'
    # a missing path resolves to ""
    s3 = graph.resolve(llm("e", "[{{steps.b.output.hits.7}}]"), states)
    assert s3.messages[0].content == "[]"


def test_resolve_whole_reference_keeps_json_value() -> None:
    states = {"b": done(data={"hits": ["h0", "h1"], "n": 2})}
    t = graph.resolve(
        tool(
            "t",
            {
                "hits": "{{steps.b.output.hits}}",
                "n": "{{steps.b.output.n}}",
                "s": "n={{steps.b.output.n}}",
                "lit": 5,
            },
        ),
        states,
    )
    assert isinstance(t, ToolStep)
    assert t.args == {"hits": ["h0", "h1"], "n": 2, "s": "n=2", "lit": 5}


@pytest.mark.parametrize(
    ("expr", "holds"),
    [
        ("steps.a.output == 'weather'", True),
        ("steps.a.output == 'Weather '", True),  # case and surrounding space do not matter
        ("steps.a.output != 'weather'", False),
        ("steps.a.output != travel", True),
        ("steps.b.output.kind contains rain", True),
        ("steps.b.output.kind contains snow", False),
        ("steps.b.output.kind not-contains snow", True),
        ("steps.a.output", True),
        ("steps.b.output.missing", False),
        ("steps.b.output.flag", False),
    ],
)
def test_conditions(expr: str, holds: bool) -> None:
    states = {"a": done("weather"), "b": done(data={"kind": "light rain", "flag": False})}
    assert graph.condition_holds(expr, states) is holds


def test_condition_operands_are_not_injectable() -> None:
    # the output contains an operator, but operands are parsed before substitution
    states = {"a": done("x == x")}
    assert graph.condition_holds("steps.a.output == 'y'", states) is False


def test_advance_readiness_and_fan_in() -> None:
    chain = Chain(
        id="c",
        steps=[
            llm("a"),
            tool("b", after=["a"]),
            tool("c", after=["a"]),
            llm("d", after=["b", "c"]),
        ],
    )
    adv = graph.advance(chain, {s.id: StepState() for s in chain.steps})
    assert adv.ready == ["a"] and not adv.done
    states = {"a": done("x"), "b": StepState(), "c": StepState(), "d": StepState()}
    assert graph.advance(chain, states).ready == ["b", "c"]
    states["b"] = done("b")
    states["c"] = StepState(status="dispatched", attempt=1)
    assert graph.advance(chain, states).ready == []  # fan-in waits for every branch
    states["c"] = done("c")
    assert graph.advance(chain, states).ready == ["d"]
    states["d"] = done("d")
    assert graph.advance(chain, states).done


def test_advance_skips_and_propagates() -> None:
    chain = Chain(
        id="c",
        steps=[
            llm("classify"),
            tool("w", when="steps.classify.output == weather"),
            llm("w2", "{{steps.w.output}}"),  # only depends on a skipped step: skipped too
            tool("s", when="steps.classify.output == travel"),
            llm("answer", "{{steps.w2.output}} {{steps.s.output}}"),  # fan-in with one live branch
        ],
    )
    states = {s.id: StepState() for s in chain.steps}
    states["classify"] = done("travel")
    adv = graph.advance(chain, states)
    assert adv.skipped == ["w", "w2"]
    assert adv.ready == ["s"]
    states.update(
        {"w": StepState(status="skipped"), "w2": StepState(status="skipped"), "s": done("t")}
    )
    adv = graph.advance(chain, states)
    assert adv.ready == ["answer"]
    resolved = graph.resolve(chain.step("answer"), states)
    assert resolved.messages[0].content == " t"  # the skipped branch reads ""


def test_advance_all_skipped_is_done() -> None:
    chain = Chain(
        id="c", steps=[llm("a"), llm("b", when="steps.a.output == yes"), llm("c", after=["b"])]
    )
    adv = graph.advance(chain, {"a": done("no"), "b": StepState(), "c": StepState()})
    assert adv.skipped == ["b", "c"] and adv.ready == [] and adv.done


def test_advance_reports_failed_dependency() -> None:
    chain = Chain(id="c", steps=[llm("a"), llm("b", after=["a"])])
    adv = graph.advance(chain, {"a": StepState(status="failed", attempt=3), "b": StepState()})
    assert adv.failed_dep == "a" and not adv.ready
