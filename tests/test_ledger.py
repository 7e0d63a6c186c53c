"""The ledger's check (chainyard.ledger.check) on hand-made snapshots: what it must call lost,
duplicated or unexpected, and what it must let pass, with two tenants under one chain id."""

from __future__ import annotations

from chainyard.contracts import (
    Assignment,
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainFailed,
    ChainRejected,
    ChainState,
    ErrorInfo,
    Event,
    FieldError,
    LlmStep,
    Message,
    Output,
    StepCompleted,
    StepFailed,
    StepState,
    Target,
    ToolStep,
    encode,
)
from chainyard.ledger import DeadLetter, LoggedEvent, Snapshot, check

TARGET = Target(deployment="d", pool="p", provider="openai", model="m")
CHAIN = Chain(
    id="c-1",
    steps=[
        LlmStep(id="a", model="m", messages=[Message(role="user", content="hi")]),
        LlmStep(id="b", model="m", messages=[Message(role="user", content="{{steps.a.output}}")]),
    ],
)


class Log:
    """Builds a snapshot: events in stream order, states, dead letters."""

    def __init__(self) -> None:
        self.snap = Snapshot()

    def event(self, ev: Event, subject_tenant: str | None = None) -> None:
        kind = ev.__struct_config__.tag
        tenant = subject_tenant or ev.tenant
        subject = f"cy.events.{tenant}.{ev.chain_id}.{kind}"
        self.snap.events.append(LoggedEvent(len(self.snap.events) + 1, subject, ev))

    def completed_chain(self, tenant: str, texts: tuple[str, str] = ("x", "y")) -> None:
        outs = {"a": Output(text=texts[0]), "b": Output(text=texts[1])}
        for sid, out in outs.items():
            self.event(
                StepCompleted(
                    chain_id=CHAIN.id,
                    step_id=sid,
                    attempt=1,
                    tenant=tenant,
                    output=out,
                    target=TARGET,
                    worker="w",
                    dispatched_at_ms=0,
                    started_at_ms=0,
                    latency_ms=1.0,
                )
            )
        steps = {sid: StepState(status="completed", attempt=1, output=o) for sid, o in outs.items()}
        self.snap.states[(tenant, CHAIN.id)] = ChainState(
            chain=CHAIN, tenant=tenant, status="completed", steps=steps, created_at_ms=0
        )
        self.event(ChainCompleted(chain_id=CHAIN.id, tenant=tenant, output=outs["b"]))


def test_two_tenants_same_id_and_a_refused_reuse() -> None:
    log = Log()
    log.completed_chain("ta", ("ta-a", "ta-b"))
    log.completed_chain("tb", ("tb-a", "tb-b"))
    # ta sends a different chain under its used id: refused, the chain holding it goes on
    err = FieldError(path="$.id", message="in use")
    log.event(ChainRejected(chain_id=CHAIN.id, tenant="ta", errors=[err], id_in_use=True))
    log.snap.dead.append(DeadLetter(1, "cy.dlq.intake", "ta", "in use", b"{}"))
    r = check(
        log.snap,
        [("ta", CHAIN.id), ("tb", CHAIN.id)],
        outputs={("ta", CHAIN.id): "ta-b", ("tb", CHAIN.id): "tb-b"},
    )
    assert r.ok, r.details()
    assert r.completed == 2 and r.notes["id_in_use_rejections"] == 1


def test_a_rejection_that_is_not_id_in_use_is_unexpected() -> None:
    log = Log()
    log.completed_chain("ta")
    err = FieldError(path="$.steps", message="bad")
    log.event(ChainRejected(chain_id=CHAIN.id, tenant="ta", errors=[err]))
    log.snap.dead.append(DeadLetter(1, "cy.dlq.intake", "ta", "bad", b"{}"))
    r = check(log.snap, [("ta", CHAIN.id)])
    assert any("accepted chain got chain.rejected" in u for u in r.unexpected), r.details()


def test_the_answer_must_be_the_chains_own() -> None:
    log = Log()
    log.completed_chain("ta", ("ta-a", "ta-b"))
    # the scenario computed another text: tb's answer ended up in ta's chain
    r = check(log.snap, [("ta", CHAIN.id)], outputs={("ta", CHAIN.id): "tb-b"})
    assert any("its steps produce" in u for u in r.unexpected), r.details()
    # the chain's end names an output that is not its output step's
    log = Log()
    log.completed_chain("ta", ("ta-a", "ta-b"))
    end = log.snap.events.pop()
    assert isinstance(end.event, ChainCompleted)
    log.event(ChainCompleted(chain_id=CHAIN.id, tenant="ta", output=Output(text="ta-a")))
    r = check(log.snap, [("ta", CHAIN.id)])
    assert any("is not step b's" in u for u in r.unexpected), r.details()


def test_an_event_under_another_tenants_subject_is_unexpected() -> None:
    log = Log()
    log.completed_chain("ta")
    log.completed_chain("tb")
    ev = log.snap.events[0].event
    assert ev is not None
    log.event(ev, subject_tenant="tb")  # ta's event stored on tb's subject
    r = check(log.snap, [("ta", CHAIN.id), ("tb", CHAIN.id)])
    assert any("is of ta/c-1" in u for u in r.unexpected), r.details()


def test_cancelled_and_failed_with_their_reasons() -> None:
    log = Log()
    for tenant, status in (("ta", "cancelled"), ("tb", "failed")):
        st = StepState(status="cancelled")
        log.snap.states[(tenant, CHAIN.id)] = ChainState(
            chain=CHAIN,
            tenant=tenant,
            status=status,  # type: ignore[arg-type]
            steps={"a": st, "b": st},
            created_at_ms=0,
            reason="deadline exceeded (1 ms)" if status == "failed" else "by ta",
        )
    log.event(ChainCancelled(chain_id=CHAIN.id, tenant="ta", reason="by ta"))
    log.event(ChainFailed(chain_id=CHAIN.id, tenant="tb", reason="deadline exceeded (1 ms)"))
    keys = [("ta", CHAIN.id), ("tb", CHAIN.id)]
    expect = {("ta", CHAIN.id): "cancelled", ("tb", CHAIN.id): "failed"}
    r = check(log.snap, keys, expect=expect, reasons={("tb", CHAIN.id): "deadline exceeded"})
    assert r.ok and r.cancelled == 1 and r.failed == 1, r.details()
    r = check(log.snap, keys, expect=expect, reasons={("tb", CHAIN.id): "no capacity"})
    assert any("expected 'no capacity'" in u for u in r.unexpected), r.details()
    r = check(log.snap, keys)  # both expected to complete
    assert len(r.unexpected) == 2, r.details()


def test_a_poison_step_needs_its_dead_letter_and_its_step_failed() -> None:
    chain = Chain(id="p-1", steps=[ToolStep(id="t", tool="crash")])
    state = ChainState(
        chain=chain,
        tenant="ta",
        status="failed",
        steps={
            "t": StepState(
                status="failed", attempt=1, error=ErrorInfo(cls="fatal", message="poison")
            )
        },
        created_at_ms=0,
        reason="step 't' failed",
    )
    key, poison = ("ta", "p-1"), {("ta", "p-1", "t")}
    log = Log()
    log.snap.states[key] = state
    failed = StepFailed(
        chain_id="p-1",
        step_id="t",
        attempt=1,
        tenant="ta",
        error=ErrorInfo(cls="fatal", message="poison"),
        target=TARGET,
        worker="w",
    )
    log.event(failed)
    log.event(ChainFailed(chain_id="p-1", tenant="ta", reason="step 't' failed"))
    r = check(log.snap, [key], expect="failed", expected_dead=poison)
    assert any("no work dead letter" in x for x in r.lost), r.details()
    work = Assignment(
        chain_id="p-1", step_id="t", attempt=1, tenant="ta", step=chain.steps[0],
        target=TARGET, dispatched_at_ms=0,
    )  # fmt: skip
    dead = DeadLetter(1, "cy.dlq.work", "ta", "poison", encode(work), "p-1", "t")
    log.snap.dead.append(dead)
    assert check(log.snap, [key], expect="failed", expected_dead=poison).ok
    # not announced as poison: a work dead letter is unexpected
    r = check(log.snap, [key], expect="failed")
    assert any("work dead letter" in u for u in r.unexpected), r.details()
    log.snap.dead.append(DeadLetter(2, "cy.dlq.work", "ta", "poison", encode(work), "p-1", "t"))
    r = check(log.snap, [key], expect="failed", expected_dead=poison)
    assert any("2 dead letters" in x for x in r.duplicated), r.details()


def _late_failure(tenant: str, sid: str) -> StepFailed:
    return StepFailed(
        chain_id=CHAIN.id, step_id=sid, attempt=1, tenant=tenant, target=TARGET, worker="zombie",
        error=ErrorInfo(cls="retryable", message="reset mid-body"),
    )  # fmt: skip


def test_one_attempt_failed_and_completed_either_count_is_explained() -> None:
    """A worker past its ack wait fails attempt 1 while the worker its work went to completes
    it; the engine counted the completion (it handled that event first): clean, whatever the
    order in the stream. A state the log cannot explain is still caught."""
    log = Log()
    log.snap.events.append(LoggedEvent(0, "cy.events.ta.c-1.step.failed", _late_failure("ta", "a")))
    log.completed_chain("ta")
    assert check(log.snap, {("ta", CHAIN.id)}).ok
    # KV says attempt 2 completed: no event of attempt 2 explains it
    bad = log.snap.states[("ta", CHAIN.id)]
    steps = {**bad.steps, "a": StepState(status="completed", attempt=2, output=Output(text="x"))}
    log.snap.states[("ta", CHAIN.id)] = ChainState(
        chain=CHAIN, tenant="ta", status="completed", steps=steps, created_at_ms=0
    )
    r = check(log.snap, {("ta", CHAIN.id)})
    assert not r.ok and "ta/c-1: step a completed in KV without a step.completed event" in r.lost
