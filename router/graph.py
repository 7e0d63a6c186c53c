"""Pure chain-graph logic: dependencies, readiness, references and conditions. No I/O.

References: `{{steps.<id>.output}}` is a step's text (its JSON `data` as JSON text when it has
no text); `{{steps.<id>.output.<key>.<index>...}}` reaches into its JSON `data`. A string that is
exactly one reference takes the referenced JSON value as it is (so tool args keep their types).

Conditions (`when`): `<operand>` (truthy), or `<operand> <op> <operand>` with op one of
`==`, `!=`, `contains`, `not-contains`; an operand is `steps.<id>.output[.path]` or a quoted
literal. Operands are parsed before anything is substituted, so step output cannot inject logic.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from chainyard.contracts import Chain, LlmStep, Output, Step, StepState, ToolStep

REF = re.compile(r"\{\{\s*steps\.([A-Za-z0-9_-]+)\.output((?:\.[A-Za-z0-9_-]+)*)\s*\}\}")
_OPERAND = re.compile(r"^steps\.([A-Za-z0-9_-]+)\.output((?:\.[A-Za-z0-9_-]+)*)$")
_OPS = ("==", "!=", "contains", "not-contains")
_FALSY = {"", "false", "0", "no", "none", "null"}
NO_LOOP_CACHE = "cache is for one model call; an agent loop step (with `loop`) cannot be cached"


class GraphError(ValueError):
    """A chain whose graph cannot run: the message says which step and why."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _texts(step: Step) -> Iterable[str]:
    if isinstance(step, LlmStep):
        for m in step.messages:
            yield m.content
    elif isinstance(step, ToolStep):
        yield from _strings(step.args)


def parse_condition(expr: str) -> tuple[str, str, str] | tuple[str]:
    try:
        parts = shlex.split(expr)
    except ValueError as e:
        raise GraphError("when", f"cannot parse condition {expr!r}: {e}") from e
    if len(parts) == 1:
        return (parts[0],)
    if len(parts) == 3 and parts[1] in _OPS:
        return (parts[0], parts[1], parts[2])
    raise GraphError("when", f"condition {expr!r} must be `operand` or `a OP b`, OP in {_OPS}")


def _condition_refs(expr: str) -> list[str]:
    return [m.group(1) for p in parse_condition(expr) if (m := _OPERAND.match(p))]


def dependencies(step: Step) -> set[str]:
    deps = set(step.after)
    for text in _texts(step):
        deps.update(m.group(1) for m in REF.finditer(text))
    if step.when:
        deps.update(_condition_refs(step.when))
    return deps


def validate(chain: Chain) -> list[GraphError]:
    """Every problem with the graph: duplicate ids, unknown references, cycles, bad output."""
    errors: list[GraphError] = []
    ids = [s.id for s in chain.steps]
    index = {sid: i for i, sid in enumerate(ids)}
    seen: set[str] = set()
    for i, sid in enumerate(ids):
        if sid in seen:
            errors.append(GraphError(f"$.steps[{i}].id", f"duplicate step id {sid!r}"))
        seen.add(sid)
    deps: dict[str, set[str]] = {}
    for i, s in enumerate(chain.steps):
        try:
            deps[s.id] = dependencies(s)
        except GraphError as e:
            errors.append(GraphError(f"$.steps[{i}].when", e.message))
            deps[s.id] = set(s.after)
        for d in sorted(deps[s.id]):
            if d not in index:
                errors.append(
                    GraphError(f"$.steps[{i}]", f"step {s.id!r} refers to unknown step {d!r}")
                )
            elif d == s.id:
                errors.append(GraphError(f"$.steps[{i}]", f"step {s.id!r} refers to itself"))
    for i, s in enumerate(chain.steps):
        if isinstance(s, LlmStep) and s.cache is not None and s.loop is not None:
            errors.append(GraphError(f"$.steps[{i}].cache", NO_LOOP_CACHE))
    if chain.output is not None and chain.output not in index:
        errors.append(GraphError("$.output", f"output names unknown step {chain.output!r}"))
    if not errors:
        cycle = _find_cycle(deps)
        if cycle:
            errors.append(GraphError("$.steps", "cycle: " + " -> ".join(cycle)))
    return errors


def _find_cycle(deps: Mapping[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(deps.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if state.get(d) is None and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in deps:
        if state.get(n) is None and (c := visit(n)):
            return c
    return None


def _dig(value: Any, path: str) -> Any:
    for key in filter(None, path.split(".")):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            return None
    return value


def _value(states: Mapping[str, StepState], sid: str, path: str) -> Any:
    out = states[sid].output if sid in states else None
    if out is None:
        return None if path else ""
    if path:
        return _dig(out.data, path)
    return out.text if out.text or out.data is None else out.data


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _resolve_str(text: str, states: Mapping[str, StepState]) -> Any:
    whole = REF.fullmatch(text.strip())
    if whole:
        return _value(states, whole.group(1), whole.group(2))
    return REF.sub(lambda m: _as_text(_value(states, m.group(1), m.group(2))), text)


def _resolve_any(value: Any, states: Mapping[str, StepState]) -> Any:
    if isinstance(value, str):
        return _resolve_str(value, states)
    if isinstance(value, dict):
        return {k: _resolve_any(v, states) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_any(v, states) for v in value]
    return value


def resolve(step: Step, states: Mapping[str, StepState]) -> Step:
    """The step with every reference replaced by the outputs recorded so far."""
    if isinstance(step, ToolStep):
        return msgspec.structs.replace(step, args=_resolve_any(step.args, states))
    if not isinstance(step, LlmStep):
        return step
    messages = [
        msgspec.structs.replace(m, content=_as_text(_resolve_str(m.content, states)))
        if "{{" in m.content
        else m
        for m in step.messages
    ]
    return msgspec.structs.replace(step, messages=messages)


def _operand(text: str, states: Mapping[str, StepState]) -> Any:
    m = _OPERAND.match(text)
    return _value(states, m.group(1), m.group(2)) if m else text


def condition_holds(expr: str, states: Mapping[str, StepState]) -> bool:
    parts = parse_condition(expr)
    if len(parts) == 1:
        return _as_text(_operand(parts[0], states)).strip().lower() not in _FALSY
    a, op, b = _as_text(_operand(parts[0], states)), parts[1], _as_text(_operand(parts[2], states))
    a_, b_ = a.strip().lower(), b.strip().lower()
    return {
        "==": a_ == b_,
        "!=": a_ != b_,
        "contains": b_ in a_,
        "not-contains": b_ not in a_,
    }[op]


class Advance(msgspec.Struct, frozen=True, kw_only=True):
    """What the graph says next: steps to run, steps to skip, or that the chain is over."""

    ready: list[str] = []
    skipped: list[str] = []
    failed_dep: str | None = None  # a step failed, so the chain cannot complete
    done: bool = False


def advance(chain: Chain, states: Mapping[str, StepState]) -> Advance:
    """Which pending steps can run now, which are skipped, and whether the chain is finished.

    Skipping propagates: a step whose conditions are false is skipped, and so is a step whose
    every dependency was skipped (the rest of that branch). A fan-in with at least one live
    dependency runs, reading "" for the skipped ones.
    """
    status = {sid: st.status for sid, st in states.items()}
    ready: list[str] = []
    skipped: list[str] = []
    changed = True
    while changed:  # skips can cascade within one call
        changed = False
        for step in chain.steps:
            if status.get(step.id, "pending") != "pending":
                continue
            deps = dependencies(step)
            dep_status = [status.get(d, "pending") for d in deps]
            if "failed" in dep_status:
                return Advance(failed_dep=next(d for d in deps if status.get(d) == "failed"))
            if any(s not in ("completed", "skipped") for s in dep_status):
                continue
            all_skipped = bool(deps) and all(s == "skipped" for s in dep_status)
            if all_skipped or (step.when and not condition_holds(step.when, states)):
                status[step.id] = "skipped"
                skipped.append(step.id)
                changed = True
            else:
                status[step.id] = "dispatched"
                ready.append(step.id)
    done = all(status.get(s.id, "pending") in ("completed", "skipped") for s in chain.steps)
    return Advance(ready=ready, skipped=skipped, done=done and not ready)


def chain_output(chain: Chain, states: Mapping[str, StepState]) -> Output:
    st = states.get(chain.output_step)
    return st.output if st and st.output else Output()
