"""The ledger check: did every accepted chain and step end in exactly one terminal state?

Sources (read-only): the event log (stream CY_EVENTS), chain state (KV cy_chains), the dead
letters (stream CY_DLQ), and the submitter's own list of what the intake accepted (a publish
acknowledged by the stream) and what it expects to be rejected. Everything is keyed by
(tenant, chain id): two tenants may use the same chain id. Definitions in docs/RELIABILITY.md;
in short, per accepted chain:

- lost: no state in KV, a chain still `running`, no terminal chain event, a completed chain
  with a step that is neither completed nor skipped, an expected work dead letter (a poison
  step) missing or without its `step.failed`;
- duplicated: more than one terminal chain event, more than one `step.completed` for the same
  (chain, step, attempt), a step whose recorded cost or usage is not that of exactly the one
  completion the state counted (a provider call counted twice), a chain total that differs
  from the sum of its steps, two dead letters for one attempt of a step;
- unexpected: anything that should not exist: events, state or dead letters for chains nobody
  submitted, an event or state of one tenant under another's subject or key, a chain.rejected
  for an accepted chain (except `id_in_use`: a different chain sent under its id, which does
  not end it), a status or reason other than the scenario expects, a failure without a reason,
  KV state that differs from the state rebuilt from the event log, a completed chain whose
  output is not its output step's (or not the one the scenario computed).

`check()` is pure (data in, report out); `collect()` reads the three sources from NATS
(_ledger_read.py, with the snapshot's types); `audit()` is the two in a row.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nats.js import JetStreamContext

from chainyard._ledger_read import DeadLetter, Key, LoggedEvent, Snapshot, collect, read_stream
from chainyard.contracts import (
    BadMessage,
    ChainCancelled,
    ChainCompleted,
    ChainFailed,
    ChainRejected,
    ChainState,
    ControlRejected,
    Event,
    LlmStep,
    Step,
    StepCompleted,
    StepFailed,
    StepState,
    Topology,
    Usage,
    WaitStep,
    assignment_decoder,
)

COST_EPS = 1e-12
Terminal = ChainCompleted | ChainFailed | ChainCancelled
# What a scenario expects a chain to end as: "completed", "failed", "cancelled", or None (any);
# one for all chains, or per chain (a chain missing from the mapping: any).
Expect = str | None | Mapping[Key, str | None]
StepKey = tuple[str, str, str]  # (tenant, chain id, step id)


@dataclass
class Report:
    scenario: str = ""
    accepted: int = 0
    steps: int = 0
    completed: int = 0  # chains
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    events: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: dict[str, float | int | str] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)  # why chains failed, cut short

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"{self.scenario or 'run'}: chains={self.accepted} steps={self.steps} "
            f"completed={self.completed} failed={self.failed} cancelled={self.cancelled} "
            f"rejected={self.rejected} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} unexpected={len(self.unexpected)}"
            + (f" {extra}" if extra else "")
        )

    def details(self, limit: int = 20) -> str:
        out = [self.line()]
        for name in ("lost", "duplicated", "unexpected"):
            items: list[str] = getattr(self, name)
            out += [f"  {name}: {x}" for x in items[:limit]]
            if len(items) > limit:
                out.append(f"  {name}: ... {len(items) - limit} more")
        out += [f"  {n} ended: {why}" for why, n in self.reasons.most_common(5)]
        return "\n".join(out)


def _subject_key(prefix: str, subject: str) -> Key | None:
    parts = subject.split(".")
    if len(parts) >= 4 and parts[0] == prefix:
        return (parts[2], parts[3])
    return None


def check(
    snapshot: Snapshot,
    accepted: Iterable[Key],
    *,
    expected_rejected: Iterable[Key] = (),
    expect: Expect = "completed",
    reasons: Mapping[Key, str] | None = None,
    outputs: Mapping[Key, str] | None = None,
    expected_dead: Iterable[StepKey] = (),
    allow_dead_letters: bool = False,
    prefix: str = "cy",
    scenario: str = "",
) -> Report:
    """Compare what was accepted with what the system recorded.

    `expect`: the terminal status each accepted chain must have. `reasons`: the prefix a failed
    or cancelled chain's reason must start with. `outputs`: the final text a completed chain
    must have (what its steps produce, computed by the scenario). `expected_rejected`: chains
    that must end in exactly one chain.rejected, with nothing created, and their message in the
    DLQ. `expected_dead`: poison steps, each of which must have a work dead letter and a
    step.failed.
    """
    accepted_set = set(accepted)
    rejected_set = set(expected_rejected)
    r = Report(scenario=scenario, accepted=len(accepted_set), events=len(snapshot.events))

    by_chain: dict[Key, list[LoggedEvent]] = defaultdict(list)
    for le in snapshot.events:
        k = _subject_key(prefix, le.subject)
        if le.event is None or k is None:
            r.unexpected.append(f"undecodable event seq={le.seq} on {le.subject}")
            continue
        own = (le.event.tenant, le.event.chain_id)
        if own != k:
            r.unexpected.append(f"event seq={le.seq} on {le.subject} is of {own[0]}/{own[1]}")
        by_chain[k].append(le)

    for k in sorted(set(by_chain) - accepted_set - rejected_set):
        # The router's answer to a control message for a chain that never came is an answer
        # to its sender, not a chain's event.
        kinds = Counter(
            _kind(le.event)
            for le in by_chain[k]
            if not (isinstance(le.event, ControlRejected) and k not in snapshot.states)
        )
        if kinds:
            r.unexpected.append(
                f"{k[0]}/{k[1]}: events for a chain nobody submitted: {dict(kinds)}"
            )
    for k in sorted(set(snapshot.states) - accepted_set):
        r.unexpected.append(
            f"{k[0]}/{k[1]}: state for a chain nobody submitted (or a rejected one)"
        )
    for k, st in snapshot.states.items():
        if (st.tenant, st.chain.id) != k:
            r.unexpected.append(f"{k[0]}/{k[1]}: KV state is {st.tenant}/{st.chain.id}'s")

    for k in sorted(rejected_set):
        evs = by_chain.get(k, [])
        rej = [le for le in evs if isinstance(le.event, ChainRejected)]
        if not rej:
            r.lost.append(f"{k[0]}/{k[1]}: no chain.rejected for a chain that had to be rejected")
        elif len(rej) > 1 and k not in accepted_set:
            r.duplicated.append(f"{k[0]}/{k[1]}: {len(rej)} chain.rejected events")
        if k not in accepted_set:
            r.rejected += 1 if rej else 0
            others = [le for le in evs if not isinstance(le.event, ChainRejected)]
            if others:
                r.unexpected.append(
                    f"{k[0]}/{k[1]}: rejected chain has other events: {len(others)}"
                )

    for k in sorted(accepted_set):
        want = expect.get(k) if isinstance(expect, Mapping) else expect
        _check_chain(
            r,
            k,
            by_chain.get(k, []),
            snapshot.states.get(k),
            want,
            (reasons or {}).get(k),
            (outputs or {}).get(k),
        )
    in_use = sum(
        1
        for k in accepted_set
        for le in by_chain.get(k, [])
        if isinstance(le.event, ChainRejected) and le.event.id_in_use
    )
    if in_use:
        r.notes["id_in_use_rejections"] = in_use

    # Dead letters: one per chain.rejected (the refused intake message), the expected poison
    # steps' work messages; anything else is unexpected.
    rejections = sum(isinstance(le.event, ChainRejected) for le in snapshot.events)
    intake_dead = [d for d in snapshot.dead if d.subject.endswith(".intake")]
    work_dead = [d for d in snapshot.dead if d.subject.endswith(".work")]
    other_dead = [d for d in snapshot.dead if d not in intake_dead and d not in work_dead]
    if len(intake_dead) < rejections:
        r.lost.append(
            f"dlq: {len(intake_dead)} intake dead letters for {rejections} chain.rejected events"
        )
    elif len(intake_dead) > rejections and not allow_dead_letters:
        r.unexpected.append(
            f"dlq: {len(intake_dead) - rejections} intake dead letters beyond the rejections"
        )
    _check_work_dead(r, work_dead, set(expected_dead), by_chain, allow_dead_letters)
    if not allow_dead_letters:
        for d in other_dead:
            r.unexpected.append(f"dlq: {d.subject} seq={d.seq}: {d.reason[:200]}")
    for d in snapshot.dead:
        if not d.reason:
            r.unexpected.append(f"dlq: {d.subject} seq={d.seq} has no reason")
    return r


def _check_work_dead(
    r: Report,
    dead: list[DeadLetter],
    expected: set[StepKey],
    by_chain: Mapping[Key, list[LoggedEvent]],
    allow: bool,
) -> None:
    seen: Counter[tuple[str, str, str, int]] = Counter()
    for d in dead:
        sk = (d.tenant or "", d.chain or "", d.step or "")
        if sk not in expected:
            if not allow:
                r.unexpected.append(
                    f"dlq: work dead letter seq={d.seq} of {sk[0]}/{sk[1]} step {sk[2]}: "
                    f"{d.reason[:200]}"
                )
            continue
        try:
            attempt = assignment_decoder.decode(d.data).attempt
        except BadMessage:
            attempt = 0
        seen[(*sk, attempt)] += 1
    for (t, c, s, attempt), n in seen.items():
        if n > 1:
            r.duplicated.append(f"dlq: {n} dead letters for {t}/{c} step {s} attempt {attempt}")
    for t, c, s in sorted(expected):
        if not any(x[:3] == (t, c, s) for x in seen):
            r.lost.append(f"{t}/{c}: no work dead letter for poison step {s}")
        failed = [
            le
            for le in by_chain.get((t, c), [])
            if isinstance(le.event, StepFailed) and le.event.step_id == s
        ]
        if not failed:
            r.lost.append(f"{t}/{c}: poison step {s} dead-lettered without a step.failed")


def _kind(ev: Event | None) -> str:
    return str(ev.__struct_config__.tag) if ev is not None else "?"


def _check_chain(
    r: Report,
    k: Key,
    evs: list[LoggedEvent],
    state: ChainState | None,
    expect: str | None,
    reason: str | None,
    output: str | None,
) -> None:
    name = f"{k[0]}/{k[1]}"
    terminal = [le for le in evs if isinstance(le.event, Terminal)]
    refused = [le for le in evs if isinstance(le.event, ChainRejected) and not le.event.id_in_use]
    if refused:
        r.unexpected.append(f"{name}: accepted chain got chain.rejected: {_errors(refused[0])}")
    if state is None:
        r.lost.append(f"{name}: accepted but no chain state")
        return
    r.steps += len(state.steps)
    if len(terminal) > 1:
        kinds = [_kind(le.event) for le in terminal]
        r.duplicated.append(f"{name}: {len(terminal)} terminal chain events {kinds}")
    if state.status == "running":
        kinds = [f"{_kind(le.event)}@{le.seq}" for le in evs]
        r.lost.append(f"{name}: still running (steps: {_statuses(state)}; log: {kinds})")
        return
    if not terminal:
        r.lost.append(f"{name}: state {state.status} but no terminal chain event")
        return
    end = terminal[0]
    ev = end.event
    assert isinstance(ev, Terminal)
    want = _kind(ev).removeprefix("chain.")
    if state.status != want:
        r.unexpected.append(f"{name}: KV says {state.status}, event log says {want}")
    why = "" if isinstance(ev, ChainCompleted) else ev.reason
    if want == "completed":
        r.completed += 1
    elif want == "failed":
        r.failed += 1
    else:
        r.cancelled += 1
    if want != "completed" and not why:
        r.unexpected.append(f"{name}: chain.{want} without a reason")
    elif want != "completed":
        r.reasons[f"{want}: {why[:100]}"] += 1
    if expect is not None and want != expect:
        r.unexpected.append(f"{name}: ended {want}, expected {expect} ({why[:200]})")
    elif reason is not None and want != "completed" and not why.startswith(reason):
        r.unexpected.append(f"{name}: {want} with reason {why[:200]!r}, expected {reason!r}...")

    # Step events, in stream order, before the terminal chain event (what the state counted).
    step_evs = [le for le in evs if isinstance(le.event, StepCompleted | StepFailed)]
    completions: Counter[tuple[str, int]] = Counter(
        (le.event.step_id, le.event.attempt)
        for le in step_evs
        if isinstance(le.event, StepCompleted)
    )
    for (sid, att), n in completions.items():
        if n > 1:
            r.duplicated.append(f"{name}: step {sid} attempt {att} completed {n} times")
    counted = [le for le in step_evs if le.seq < end.seq]
    rebuilt = rebuild(counted)
    total_cost = 0.0
    for sid, st in state.steps.items():
        spec = _spec(state, sid)
        if isinstance(spec, WaitStep) or (st.status == "completed" and st.attempt == 0):
            # No worker ran it: a wait step ends by its signal or timeout, and a step a replay
            # kept has its output from the replayed chain (attempt 0, no call, no cost).
            total_cost += st.cost_usd
            continue
        if isinstance(spec, LlmStep) and spec.loop is not None:
            _check_loop(r, name, sid, st, step_evs, reason=why)
            total_cost += st.cost_usd
            continue
        if st.status == "completed":
            done = [
                le.event
                for le in step_evs
                if isinstance(le.event, StepCompleted)
                and le.event.step_id == sid
                and le.event.attempt == st.attempt
            ]
            if not done:
                r.lost.append(f"{name}: step {sid} completed in KV without a step.completed event")
                continue
            c = done[0]
            if abs(st.cost_usd - c.cost_usd) > COST_EPS or st.usage != c.usage:
                r.duplicated.append(
                    f"{name}: step {sid} cost {st.cost_usd} usage {st.usage} "
                    f"!= its completion's {c.cost_usd} {c.usage}"
                )
            total_cost += st.cost_usd
        elif st.status == "failed":
            if st.error is None or not st.error.message:
                r.unexpected.append(f"{name}: step {sid} failed without a reason")
        elif want == "completed" and st.status != "skipped":
            r.lost.append(f"{name}: chain completed but step {sid} is {st.status}")
        # Compare KV with the state rebuilt from the event log.
        got = rebuilt.get(sid)
        if st.status in ("completed", "failed"):
            if got is None:
                r.unexpected.append(f"{name}: step {sid} {st.status} in KV, no event in the log")
            elif st.attempt != got.attempt or st.status not in got.outcomes:
                r.unexpected.append(
                    f"{name}: step {sid} KV {st.status}/{st.attempt} != "
                    f"log {'|'.join(sorted(got.outcomes))}/{got.attempt}"
                )
            elif st.status == "completed" and got.output_text != (
                st.output.text if st.output else ""
            ):
                r.unexpected.append(f"{name}: step {sid} output differs from its event")
        elif got is not None and "completed" in got.outcomes and want == "completed":
            r.unexpected.append(f"{name}: step {sid} {st.status} in KV, completed in the log")
    if abs(ev.cost_usd - total_cost) > 1e-9:
        r.duplicated.append(
            f"{name}: chain cost {ev.cost_usd} != sum of counted steps {total_cost}"
        )
    if isinstance(ev, ChainCompleted):
        _check_output(r, name, ev, state, rebuilt, output)


def _check_output(
    r: Report,
    name: str,
    ev: ChainCompleted,
    state: ChainState,
    rebuilt: Mapping[str, RebuiltStep],
    output: str | None,
) -> None:
    """A completed chain's answer is its output step's counted completion (and, when the
    scenario computed it, exactly the text its steps produce)."""
    sid = state.chain.output_step
    st = state.steps.get(sid)
    got = rebuilt.get(sid)
    if st is None or st.status != "completed":
        return  # a skipped output step: the chain's output is empty by contract
    by_worker = not isinstance(_spec(state, sid), WaitStep) and st.attempt > 0
    from_log = got is not None and got.output_text == ev.output.text
    if st.output != ev.output or (by_worker and not from_log):
        r.unexpected.append(
            f"{name}: chain output {ev.output.text[:80]!r} is not step {sid}'s "
            f"{(got.output_text if got else None)!r:.80}"
        )
    elif output is not None and ev.output.text != output:
        r.unexpected.append(
            f"{name}: chain output {ev.output.text[:120]!r}, its steps produce {output[:120]!r}"
        )


def _spec(state: ChainState, sid: str) -> Step | None:
    """A step's definition: the chain's, or (an agent loop's tool call) the one in its state."""
    st = state.steps.get(sid)
    if st is not None and st.spec is not None:
        return st.spec
    try:
        return state.chain.step(sid)
    except KeyError:
        return None


def _check_loop(
    r: Report, name: str, sid: str, st: StepState, step_evs: list[LoggedEvent], reason: str
) -> None:
    """An agent loop's step is one model call per turn (one completion per attempt): its cost
    and usage are the sum of its turns'; it ends with an answer, or failed at a limit (the
    chain's reason says which)."""
    turns = [
        le.event
        for le in step_evs
        if isinstance(le.event, StepCompleted) and le.event.step_id == sid
    ]
    cost = sum(t.cost_usd for t in turns)
    usage = sum((t.usage for t in turns), Usage())
    if abs(st.cost_usd - cost) > COST_EPS or st.usage != usage:
        r.duplicated.append(
            f"{name}: loop {sid} cost {st.cost_usd} usage {st.usage} != its {len(turns)} "
            f"turns' {cost} {usage}"
        )
    if st.status == "completed" and (not turns or turns[-1].output != st.output):
        r.lost.append(f"{name}: loop {sid} completed without the turn that answered")
    if st.status == "failed" and not ((st.error and st.error.message) or reason):
        r.unexpected.append(f"{name}: loop {sid} failed without a reason")


@dataclass(frozen=True)
class RebuiltStep:
    attempt: int  # the step's last attempt with an event
    outcomes: Mapping[str, str]  # what that attempt's events say: "completed" (-> its output
    # text) and/or "failed" (-> "")

    @property
    def output_text(self) -> str | None:
        return self.outcomes.get("completed")


def rebuild(step_events: list[LoggedEvent]) -> dict[str, RebuiltStep]:
    """A chain's step states rebuilt from its event log alone.

    Per step, the last attempt of 1, 2, ... that has an event, and what its events say. One
    attempt can have both a failure and a completion (a worker past its ack wait, and the one
    its work went to meanwhile); the engine counts whichever it handles first while the attempt
    is current, and handles a chain's events concurrently, so either is a state the log
    explains, whatever their order in the stream.
    """
    seen: dict[tuple[str, int], dict[str, str]] = {}
    for le in step_events:
        ev = le.event
        if isinstance(ev, StepCompleted):
            seen.setdefault((ev.step_id, ev.attempt), {}).setdefault("completed", ev.output.text)
        elif isinstance(ev, StepFailed):
            seen.setdefault((ev.step_id, ev.attempt), {}).setdefault("failed", "")
    out: dict[str, RebuiltStep] = {}
    for sid in {s for s, a in seen if a == 1}:
        attempt = 1
        while (sid, attempt + 1) in seen:
            attempt += 1
        out[sid] = RebuiltStep(attempt, seen[(sid, attempt)])
    return out


def _errors(le: LoggedEvent) -> str:
    ev = le.event
    if isinstance(ev, ChainRejected):
        return "; ".join(f"{e.path}: {e.message}" for e in ev.errors)[:300]
    return ""


def _statuses(state: ChainState) -> str:
    return ",".join(f"{sid}={st.status}/{st.attempt}" for sid, st in state.steps.items())


async def audit(
    js: JetStreamContext,
    accepted: Iterable[Key],
    *,
    topology: Topology | None = None,
    **kw: object,
) -> Report:
    """collect() then check(): the ledger of a run."""
    topology = topology or Topology()
    snap = await collect(js, topology)
    r = check(snap, accepted, prefix=topology.subjects.prefix, **kw)  # type: ignore[arg-type]
    if snap.stale_reads:
        r.notes["kv_stale_reads"] = snap.stale_reads
    return r


# The reading side lives in _ledger_read; callers keep importing it from here.
__all__ = [
    "COST_EPS",
    "DeadLetter",
    "Expect",
    "Key",
    "LoggedEvent",
    "RebuiltStep",
    "Report",
    "Snapshot",
    "audit",
    "check",
    "collect",
    "read_stream",
    "rebuild",
]
