"""Telemetry helpers without NATS: propagation, span shapes, chain span ids, GenAI, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from helpers import recorded_spans
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from chainyard.contracts import (
    Assignment,
    Chain,
    ChainState,
    ErrorInfo,
    LlmStep,
    Message,
    Output,
    StepCompleted,
    StepFailed,
    StepState,
    Target,
    ToolStep,
    Usage,
)
from chainyard.runtime import chain_trace as tc
from chainyard.runtime import genai as tg
from chainyard.runtime import messaging as tm
from chainyard.runtime import tracing
from chainyard.runtime.metrics import Metrics

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """The helpers' spans through an SDK provider, as `tracing.setup` builds it."""
    monkeypatch.setattr(tm, "settle_spans", True)  # CHAINYARD_TRACE_SETTLE=true
    with recorded_spans() as exporter:
        yield exporter


def traceparent(sc: Any) -> str:
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


class FakeJs:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> str:
        self.sent.append((subject, data, headers))
        return "ack"


@dataclasses.dataclass
class FakeMsg:
    subject: str
    headers: dict[str, str] | None = None
    data: bytes = b"{}"
    settled: list[str] = dataclasses.field(default_factory=list)

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.settled.append("nak")

    async def term(self) -> None:
        self.settled.append("term")


@dataclasses.dataclass
class Outcome:
    """What `chain_trace.begin_chain` takes from the router: an outcome with a state."""

    state: ChainState


def target(pool: str = "sim") -> Target:
    return Target(deployment=f"{pool}-d", pool=pool, provider="openai", model="m-1")


def assignment(step: Any = None, attempt: int = 1) -> Assignment:
    step = step or LlmStep(id="s", model="small", messages=[Message(role="user", content="SECRET")])
    return Assignment(
        chain_id="c1",
        step_id=step.id,
        attempt=attempt,
        tenant="acme",
        step=step,
        target=target(),
        dispatched_at_ms=1,
    )


def state(**kw: Any) -> ChainState:
    chain = Chain(id="c1", steps=[LlmStep(id="s", model="small", messages=[])])
    kw.setdefault("steps", {"s": StepState()})
    return ChainState(chain=chain, tenant="acme", created_at_ms=1_700_000_000_000, **kw)


# -- propagation --------------------------------------------------------------------------


async def test_headers_are_read_case_insensitively(spans: InMemorySpanExporter) -> None:
    chat = tg.traced_chat(_answer)

    async def handler(msg: FakeMsg) -> None:
        await chat(assignment(), None)

    for key in ("traceparent", "Traceparent", "TRACEPARENT"):
        spans.clear()
        await tm.consumer(handler, "d")(FakeMsg("cy.work.sim", {"Nats-Msg-Id": "x", key: TP}))
        (sp,) = spans.get_finished_spans()
        assert f"{sp.context.trace_id:032x}" == TP.split("-")[1], key
        assert f"{sp.parent.span_id:016x}" == TP.split("-")[2], key


async def _answer(a: Any, on_delta: Any) -> Any:
    return type(
        "R",
        (),
        {
            "usage": Usage(input_tokens=1, output_tokens=2),
            "model": "m-1",
            "output": Output(text="ok", finish_reason="stop"),
            "cost_usd": 0.0,
            "ttft_ms": None,
        },
    )()


async def _noop(msg: Any) -> None:
    return None


def test_subject_templates() -> None:
    t = tm.template
    assert t("cy.submit.acme") == "cy.submit.{tenant}"
    assert t("cy.work.tool.search") == "cy.work.{pool}"
    assert t("cy.events.acme.c1.step.completed") == "cy.events.{tenant}.{chain}.step.completed"
    assert t("cy.control.acme.c1.signal.ok") == "cy.control.{tenant}.{chain}.signal.{name}"
    assert t("cy.control.acme.c1.cancel") == "cy.control.{tenant}.{chain}.cancel"
    assert t("cy.timer.acme.c1.s") == "cy.timer.{tenant}.{chain}.{step}"
    assert t("cy.deadline.acme.c1") == "cy.deadline.{tenant}.{chain}"
    assert t("cy.dlq.work") == "cy.dlq.work"


# -- off: nothing but the message id --------------------------------------------------------


async def test_off_publish_sends_only_the_message_id() -> None:
    assert tracing.active is None
    js = FakeJs()
    await tm.publish(js, "cy.work.sim", b"x", "c1.s.1")
    assert js.sent == [("cy.work.sim", b"x", {"Nats-Msg-Id": "c1.s.1"})]
    s = state()
    out = tc.begin_chain(type("O", (), {"state": s})())
    assert out.state is s  # untouched


def test_off_helpers_are_near_free() -> None:
    """Measured, not assumed: the per-message helpers cost well under a microsecond or two."""
    s = state()
    n = 20_000

    async def handler(msg: Any) -> None:
        return None

    wrapped = tm.consumer(handler, "d")
    msg = FakeMsg("cy.submit.acme")

    async def run_wrapped() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await wrapped(msg)
        return time.perf_counter() - t0

    async def run_plain() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            await handler(msg)
        return time.perf_counter() - t0

    wrapped_s = asyncio.run(run_wrapped())
    plain_s = asyncio.run(run_plain())
    t0 = time.perf_counter()
    for _ in range(n):
        tc.adopt_state(s)
        tc.chain_recorded(s, s)
    sync_s = time.perf_counter() - t0
    per_msg_us = (wrapped_s - plain_s) / n * 1e6
    per_sync_us = sync_s / n * 1e6
    print(f"off: consumer wrapper +{per_msg_us:.2f} us/msg, adopt+recorded {per_sync_us:.2f} us")
    assert per_msg_us < 5 and per_sync_us < 5


# -- on: span shapes ------------------------------------------------------------------------


async def test_send_span_injects_lowercase_traceparent(spans: InMemorySpanExporter) -> None:
    js = FakeJs()
    await tm.publish(js, "cy.work.sim", b"xyz", "c1.s.1")
    (sp,) = spans.get_finished_spans()
    headers = js.sent[0][2]
    assert sp.name == "send cy.work.{pool}" and sp.kind == SpanKind.PRODUCER
    assert headers["traceparent"] == traceparent(sp.get_span_context())
    assert headers["Nats-Msg-Id"] == "c1.s.1"
    a = sp.attributes
    assert a["messaging.system"] == "nats" and a["messaging.operation.type"] == "send"
    assert a["messaging.destination.name"] == "cy.work.sim"
    assert a["messaging.message.id"] == "c1.s.1"


async def test_the_call_span_is_the_messages_process_span(spans: InMemorySpanExporter) -> None:
    """No `process` span of the consumer's own: the worker's `chat` span is the message's
    consumer (its messaging attributes), child of the producing context; the step's event
    is produced by it, and the settle spans hang under it."""
    js = FakeJs()
    chat = tg.traced_chat(_answer)

    async def handler(msg: FakeMsg) -> None:
        await chat(assignment(), None)
        await tm.publish(js, "cy.events.acme.c1.step.completed", b"{}", "e1")
        await msg.ack()

    msg = FakeMsg("cy.work.sim", {"Traceparent": TP, "Nats-Msg-Id": "acme.c1.s.1"})
    await tm.consumer(handler, "cy_pool_sim")(msg)
    by = {s.name: s for s in spans.get_finished_spans()}
    assert not [n for n in by if n.startswith(("process ", "send "))]
    sp = by["chat m-1"]
    assert sp.kind == SpanKind.CLIENT
    assert f"{sp.parent.span_id:016x}" == TP.split("-")[2]
    assert sp.context.trace_id == int(TP.split("-")[1], 16)
    a = sp.attributes
    assert a["messaging.consumer.group.name"] == "cy_pool_sim"
    assert a["messaging.operation.type"] == "process" and a["messaging.system"] == "nats"
    assert a["messaging.destination.name"] == "cy.work.sim"
    assert a["messaging.message.id"] == "acme.c1.s.1"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.usage.output_tokens"] == 2
    assert js.sent[0][2]["traceparent"] == traceparent(sp.context)  # the event's producer
    ack = by["ack cy.work.{pool}"]
    assert ack.parent.span_id == sp.context.span_id
    assert ack.attributes["messaging.operation.type"] == "settle"
    assert msg.settled == ["ack"]


async def test_a_handler_forwards_the_trace_headers_it_got(spans: InMemorySpanExporter) -> None:
    """Nothing made current since: the onward message carries the headers as received (no
    parse, no span); baggage and the W3C fields alike."""
    js = FakeJs()

    async def handler(msg: FakeMsg) -> None:
        await tm.publish(js, "cy.events.acme.c1.chain.completed", b"{}", "e1")

    got = {"Nats-Msg-Id": "x", "Traceparent": TP, "tracestate": "k=v"}
    await tm.consumer(handler, "d")(FakeMsg("cy.events.acme.c1.step.completed", got))
    assert js.sent[0][2] == {"Nats-Msg-Id": "e1", "Traceparent": TP, "tracestate": "k=v"}
    assert spans.get_finished_spans() == ()


async def test_spans_made_in_tasks_of_a_handler_continue_its_message(
    spans: InMemorySpanExporter,
) -> None:
    """A handler that fans out (the router's effects run in `asyncio.gather`): the span made
    first resolves the message's context in its own task, and its siblings, started before
    that, must continue the same trace (they had become roots: a demo chain's second tool call
    was a trace of its own)."""
    js = FakeJs()
    tr = tracing.active
    assert tr is not None

    async def dispatch(n: int) -> None:
        span = tr.start_span(f"route {n}", context=tm.handler_context())
        span.end()
        await tm.publish(js, f"cy.work.p{n}", b"{}", f"m{n}")

    async def handler(msg: FakeMsg) -> None:
        await asyncio.gather(*(dispatch(n) for n in range(3)))

    await tm.consumer(handler, "d")(
        FakeMsg("cy.events.acme.c1.step.completed", {"traceparent": TP})
    )
    routes = spans.get_finished_spans()
    assert len(routes) == 3
    for span in routes:
        assert f"{span.context.trace_id:032x}" == TP.split("-")[1]
        assert span.parent is not None and f"{span.parent.span_id:016x}" == TP.split("-")[2]
    assert all(TP.split("-")[1] in h["traceparent"] for _, _, h in js.sent), js.sent


async def test_headerless_message_adopts_the_chain_context(spans: InMemorySpanExporter) -> None:
    chain_tp = "00-11111111111111111111111111111111-2222222222222222-01"
    s = state(trace={"traceparent": chain_tp, "parent": ""})
    js = FakeJs()

    async def handler(msg: FakeMsg) -> None:
        tc.adopt_state(s)  # what the engine does after reading the state
        await tc.publish_work(js, "cy.work.sim", b"{}", assignment(), s)
        await msg.ack()

    await tm.consumer(handler, "d")(FakeMsg("cy.timer.acme.c1.s"))
    assert js.sent[0][2]["traceparent"] == chain_tp  # the assignment continues the chain
    (ack,) = spans.get_finished_spans()
    assert ack.name == "ack cy.timer.{tenant}.{chain}.{step}"
    assert ack.parent.span_id == 0x2222222222222222


async def test_chain_span_ids_fixed_at_intake_and_emitted_at_the_end(
    spans: InMemorySpanExporter,
) -> None:
    js = FakeJs()
    holder: dict[str, Any] = {}

    async def intake(msg: FakeMsg) -> None:
        out = tc.begin_chain(
            Outcome(state(steps={"s": StepState(status="dispatched", attempt=1, target=target())}))
        )
        holder["state"] = out.state
        await tc.publish_work(
            js,
            "cy.work.sim",
            b"{}",
            assignment(),
            out.state,
            lambda: ["sim-d", "other-d"],
            "cheapest",
        )
        await msg.ack()

    await tm.consumer(intake, "intake")(FakeMsg("cy.submit.acme", {"traceparent": TP}))
    st: ChainState = holder["state"]
    chain_ctx = tc.chain_context(st)
    assert chain_ctx is not None
    chain_sc = trace.get_current_span(chain_ctx).get_span_context()
    assert chain_sc.trace_id == int(TP.split("-")[1], 16)
    by = {x.name: x for x in spans.get_finished_spans()}
    assert st.trace["parent"] == TP  # the submit's producer (a client's send span)
    assert not [n for n in by if n.startswith(("route ", "send "))]  # no span of their own
    work = js.sent[0][2]
    assert work["traceparent"] == st.trace["traceparent"]  # the first steps hang under the chain
    assert work["Nats-Msg-Id"] == "acme.c1.s.1"

    # the worker's call span records the decision that sent the assignment there
    spans.clear()
    chat = tg.traced_chat(_answer)

    async def call(msg: FakeMsg) -> None:
        await chat(assignment(), None)

    await tm.consumer(call, "cy_pool_sim")(FakeMsg("cy.work.sim", dict(work)))
    (sp,) = spans.get_finished_spans()
    assert sp.parent.span_id == chain_sc.span_id
    assert sp.attributes["chainyard.route.candidates"] == ("sim-d", "other-d")
    assert sp.attributes["chainyard.route.reason"] == "strategy cheapest"
    assert sp.attributes["chainyard.deployment"] == "sim-d"  # the choice
    assert "chainyard.route.tried" not in sp.attributes

    # later, maybe in another replica: the chain ends
    spans.clear()
    ended = msgspec.structs.replace(
        st,
        status="completed",
        chain=msgspec.structs.replace(st.chain, metadata={"feature": "search", "user": "u-1"}),
        ended_at_ms=st.created_at_ms + 1500,
        steps={
            "s": StepState(
                status="completed",
                attempt=1,
                cost_usd=0.25,
                usage=Usage(input_tokens=7, output_tokens=3),
            )
        },
    )
    tc.chain_recorded(st, ended)
    tc.chain_recorded(ended, ended)  # already ended: nothing twice
    (chain,) = spans.get_finished_spans()
    assert chain.name == "chain"
    assert chain.context.span_id == chain_sc.span_id and chain.context.trace_id == chain_sc.trace_id
    assert chain.parent.span_id == int(TP.split("-")[2], 16)
    assert chain.start_time == st.created_at_ms * 1_000_000
    assert chain.end_time == (st.created_at_ms + 1500) * 1_000_000 + 999_999  # the ms, to its end
    a = chain.attributes
    assert a["chainyard.chain.outcome"] == "completed" and a["chainyard.chain.cost_usd"] == 0.25
    assert a["chainyard.chain.input_tokens"] == 7 and a["chainyard.chain.output_tokens"] == 3
    assert a["chainyard.metadata.feature"] == "search" and a["chainyard.metadata.user"] == "u-1"


def test_route_reasons() -> None:
    a = assignment()
    assert tc.route_reason(a, StepState(), 1, None) == "only candidate"
    st = StepState(tried=["x-d"], error=ErrorInfo(cls="retryable", message="500"))
    assert tc.route_reason(a, st, 2, None) == "failover from x-d after retryable"
    assert tc.route_reason(msgspec.structs.replace(a, hedge=True), st, 2, None).startswith("hedge")


def test_route_decision_attributes() -> None:
    st = StepState(tried=["x-d"], error=ErrorInfo(cls="retryable", message="500"))
    decision = tc._decision(assignment(), state(steps={"s": st}), lambda: ["x-d", "sim-d"], None)
    header = msgspec.json.encode(decision).decode()
    assert tc.route_attributes(header) == {
        "chainyard.route.reason": "failover from x-d after retryable",
        "chainyard.route.candidates": ["x-d", "sim-d"],
        "chainyard.route.tried": ["x-d"],
    }
    only = tc._decision(assignment(), state(), None, None)  # the choice is the call's deployment
    assert tc.route_attributes(msgspec.json.encode(only).decode()) == {
        "chainyard.route.reason": "only candidate"
    }
    for bad in (None, "", "not json", '{"reason": 3}', '["x"]'):  # nothing recorded, no error
        assert tc.route_attributes(bad) == {}


# -- GenAI spans ----------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    output: Output
    usage: Usage = dataclasses.field(default_factory=Usage)
    cost_usd: float = 0.0
    model: str | None = None
    ttft_ms: float | None = None


class ProviderError(Exception):
    def __init__(self, cls: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.cls, self.status = cls, status


async def test_chat_span_attributes_and_no_prompt_text(spans: InMemorySpanExporter) -> None:
    async def execute(a: Assignment, on_delta: Any) -> Result:
        return Result(
            output=Output(text="ANSWER", finish_reason="stop"),
            usage=Usage(input_tokens=5, output_tokens=2),
            model="m-1-2025",
        )

    await tg.traced_chat(execute)(assignment(), None)
    (sp,) = spans.get_finished_spans()
    a = sp.attributes
    assert sp.name == "chat m-1" and sp.kind == SpanKind.CLIENT
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "m-1" and a["gen_ai.response.model"] == "m-1-2025"
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 2
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert not any("SECRET" in str(v) or "ANSWER" in str(v) for v in a.values())


async def test_chat_span_captures_content_only_when_asked(spans: InMemorySpanExporter) -> None:
    tracing.capture_content = True

    async def execute(a: Assignment, on_delta: Any) -> Result:
        return Result(output=Output(text="ANSWER"))

    await tg.traced_chat(execute)(assignment(), None)
    (sp,) = spans.get_finished_spans()
    assert "SECRET" in sp.attributes["gen_ai.input.messages"]
    assert "ANSWER" in sp.attributes["gen_ai.output.messages"]


async def test_chat_span_error_type(spans: InMemorySpanExporter) -> None:
    async def execute(a: Assignment, on_delta: Any) -> Result:
        raise ProviderError("retryable", "server error", 500)

    with pytest.raises(ProviderError):
        await tg.traced_chat(execute)(assignment(), None)
    (sp,) = spans.get_finished_spans()
    assert sp.attributes["error.type"] == "500"
    assert sp.attributes["chainyard.error.class"] == "retryable" and not sp.status.is_ok


async def test_tool_span(spans: InMemorySpanExporter) -> None:
    async def execute(a: Assignment, on_delta: Any = None) -> Result:
        return Result(output=Output(data={"temp": 17}))

    step = ToolStep(id="w", tool="weather", args={"city": "SECRET"})
    await tg.traced_tool("weather", execute)(assignment(step), None)
    (sp,) = spans.get_finished_spans()
    assert sp.name == "execute_tool weather"
    assert sp.attributes["gen_ai.operation.name"] == "execute_tool"
    assert sp.attributes["gen_ai.tool.name"] == "weather"
    assert not any("SECRET" in str(v) for v in sp.attributes.values())


# -- metrics --------------------------------------------------------------------------------


def test_prometheus_metrics() -> None:
    m = Metrics()
    m.setup(prometheus=True)  # registry only, no HTTP server
    assert m.on
    t = target()
    m.record("routed", 1, pool=t.pool, deployment=t.deployment)
    m.step_result(
        StepCompleted(
            chain_id="c",
            step_id="s",
            attempt=1,
            tenant="a",
            output=Output(text="x"),
            usage=Usage(input_tokens=3),
            cost_usd=0.5,
            target=t,
            worker="w",
            dispatched_at_ms=1,
            started_at_ms=1,
            latency_ms=12.0,
        )
    )
    m.step_result(
        StepFailed(
            chain_id="c",
            step_id="s",
            attempt=1,
            tenant="a",
            error=ErrorInfo(cls="retryable", message="x"),
            target=t,
            worker="w",
        )
    )
    m.record("in_flight", 1, pool="sim")
    m.record("depth", 4, pool="sim")
    m.record("ack_pending", 2, pool="sim")
    m.breaker("sim-d", "open")
    m.chain_ended("completed", 1.5, 0.5)
    text = m.render().decode()
    for line in (
        'chainyard_steps_routed_total{deployment="sim-d",pool="sim"} 1.0',
        'chainyard_steps_completed_total{deployment="sim-d",pool="sim"} 1.0',
        'chainyard_steps_failed_total{deployment="sim-d",error_class="retryable",pool="sim"} 1.0',
        'chainyard_cost_usd_total{deployment="sim-d",pool="sim"} 0.5',
        'chainyard_in_flight{pool="sim"} 1.0',
        'chainyard_queue_depth{pool="sim"} 4.0',
        'chainyard_breaker_state{deployment="sim-d"} 2.0',
        'chainyard_chains_ended_total{outcome="completed"} 1.0',
    ):
        assert line in text, line
    assert "chainyard_step_latency_seconds_bucket" in text
    m.shutdown()
    assert not m.on


# -- sampled out: nothing made, headers forwarded -------------------------------------------


@pytest.fixture
def ratio_zero() -> Iterator[InMemorySpanExporter]:
    """`parentbased_traceidratio` at 0: every new chain is sampled out."""
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    with recorded_spans(sampler=ParentBased(TraceIdRatioBased(0.0))) as exporter:
        yield exporter


def test_the_sampler_is_asked_whether_it_drops_unsampled_children() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    for sampler, drops in ((ParentBased(ALWAYS_ON), True), (ALWAYS_ON, False)):
        provider = TracerProvider(sampler=sampler)
        tracing.enable(provider, capture=False)
        try:
            assert tracing.drops_unsampled is drops
        finally:
            tracing.disable()


async def test_a_sampled_out_chain_makes_no_span_and_forwards_its_headers(
    ratio_zero: InMemorySpanExporter,
) -> None:
    js = FakeJs()
    holder: dict[str, Any] = {}

    async def intake(msg: FakeMsg) -> None:
        out = tc.begin_chain(Outcome(state()))
        holder["state"] = out.state
        await tc.publish_work(js, "cy.work.sim", b"{}", assignment(), out.state)

    await tm.consumer(intake, "intake")(FakeMsg("cy.submit.acme"))
    st: ChainState = holder["state"]
    assert st.trace is not None and "parent" not in st.trace  # sampled out: no span to emit
    work_headers = js.sent[0][2]
    assert work_headers["traceparent"] == st.trace["traceparent"]
    assert work_headers["traceparent"].endswith("-00")

    # the worker: no chat span; its event carries the work's trace headers as they came
    chat = tg.traced_chat(_answer)

    async def work(msg: FakeMsg) -> None:
        await chat(assignment(), None)
        await tm.publish(js, "cy.events.acme.c1.step.completed", b"{}", "e1")

    await tm.consumer(work, "pool")(FakeMsg("cy.work.sim", dict(work_headers)))
    assert js.sent[1][2]["traceparent"] == work_headers["traceparent"]

    # the router, on the event: the state says sampled out, nothing is extracted or made
    async def event(msg: FakeMsg) -> None:
        tc.adopt_state(st)
        assert tm.sampled_out()
        tc.chain_recorded(st, msgspec.structs.replace(st, status="completed", ended_at_ms=1))
        await tm.publish(js, "cy.events.acme.c1.chain.completed", b"{}", "e2")

    await tm.consumer(event, "engine")(FakeMsg("cy.events.acme.c1.step.completed", js.sent[1][2]))
    assert js.sent[2][2]["traceparent"] == work_headers["traceparent"]
    assert ratio_zero.get_finished_spans() == ()
