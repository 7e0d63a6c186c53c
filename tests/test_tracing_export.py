"""The direct OTLP encoder, the light tracer and the OTLP/HTTP exporter, checked with
opentelemetry-proto decoding and against the local receiver (tests/otlp_receiver.py)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceFlags
from otlp_receiver import OtlpReceiver, value

from chainyard.runtime import telemetry as tm
from chainyard.runtime import telemetry_export as tx
from chainyard.runtime import telemetry_lite as tl
from chainyard.runtime import telemetry_otlp as otlp

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ATTRS: dict[str, Any] = {
    "s": "text é",
    "b": True,
    "f": False,
    "i": 3,
    "neg": -5,
    "big": 2**62,
    "d": 1.5,
    "ls": ["x", "y"],
    "li": [1, 2],
    "ld": [0.5],
    "lb": [True, False],
    "empty": "",
}


class Keep:
    """An exporter that keeps the encoded requests."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[Any] = []

    def send(self, spans: Any) -> bool:
        self.spans.extend(spans)
        self.bodies.append(otlp.encode(spans))
        return True

    def shutdown(self) -> None:
        pass


def decode(body: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    return req


def only_span(req: ExportTraceServiceRequest) -> Any:
    (rs,) = req.resource_spans
    (ss,) = rs.scope_spans
    (s,) = ss.spans
    return s


@pytest.fixture
def lite() -> Any:
    keep = Keep()
    provider = tm.build_provider(
        Resource.create({"service.name": "svc"}), keep, schedule_delay_ms=60_000
    )
    yield provider, keep
    provider.shutdown()


def test_light_span_encodes_every_field(lite: Any) -> None:
    provider, keep = lite
    parent = tm.parse(TP)
    span = provider.get_tracer().start_span(
        "process cy.work.{pool}",
        context=tm.context_of(parent),
        kind=SpanKind.CONSUMER,
        attributes=dict(ATTRS),
        links=[Link(parent, {"why": "creation"})],
        start_time=1000,
    )
    span.set_attribute("late", 7)
    span.add_event("retry", {"n": 1}, timestamp=1500)
    span.set_status(Status(StatusCode.ERROR, "boom"))
    span.end(end_time=2000)
    provider.force_flush()
    req = decode(keep.bodies[0])
    res = {kv.key: value(kv.value) for kv in req.resource_spans[0].resource.attributes}
    assert res["service.name"] == "svc" and res["telemetry.sdk.language"] == "python"
    assert req.resource_spans[0].scope_spans[0].scope.name == "chainyard"
    s = only_span(req)
    assert s.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert s.parent_span_id.hex() == "b7ad6b7169203331"
    assert s.span_id == span.get_span_context().span_id.to_bytes(8, "big")
    assert s.name == "process cy.work.{pool}" and s.kind == 5  # SPAN_KIND_CONSUMER
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (1000, 2000)
    assert {kv.key: value(kv.value) for kv in s.attributes} == {**ATTRS, "late": 7}
    (ev,) = s.events
    assert (ev.name, ev.time_unix_nano, value(ev.attributes[0].value)) == ("retry", 1500, 1)
    (lk,) = s.links
    assert (lk.trace_id, lk.span_id) == (s.trace_id, s.parent_span_id)
    assert lk.attributes[0].key == "why" and lk.flags == 0x300
    assert (s.status.code, s.status.message) == (2, "boom")
    assert s.flags == 0x300  # has is_remote, and the parent is remote


def test_fast_path_attribute_values_decode(lite: Any) -> None:
    """The light encoder's shortcuts (small and two-byte ints, floats, cached lists) against
    opentelemetry-proto, with the general path's values around them."""
    provider, keep = lite
    attrs = {
        "i0": 0,
        "i127": 127,
        "i128": 128,
        "i16383": 16383,
        "i16384": 16384,
        "neg": -1,
        "f": 0.25,
        "f1": 1.0,
        "reasons": ["stop"],
        "mixed": ["x", 2],
        "floats": [1.5],
        "b": True,
        "s": "x" * 200,
    }
    for _ in range(2):  # the second time from the caches
        tr = provider.get_tracer()
        tr.child(None, tm.INTERNAL, tm.Fixed("n", {"fixed": 1.5}), dict(attrs)).end()
    provider.force_flush()
    for body in keep.bodies:
        req = decode(body)
        for s in req.resource_spans[0].scope_spans[0].spans:
            got = {kv.key: value(kv.value) for kv in s.attributes}
            assert got == {**attrs, "fixed": 1.5}


def test_light_spans_match_the_sdk_encoder(lite: Any) -> None:
    """Same fields as the SDK's own encoder would write for an SDK span of the same shape."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    mem = InMemorySpanExporter()
    sdk = TracerProvider(resource=Resource.create({"service.name": "svc"}))
    sdk.add_span_processor(SimpleSpanProcessor(mem))
    t = sdk.get_tracer("chainyard")
    with t.start_as_current_span("root", kind=SpanKind.SERVER) as root:
        child = t.start_span(
            "send x",
            kind=SpanKind.PRODUCER,
            attributes=dict(ATTRS),
            links=[Link(root.get_span_context())],
        )
        child.set_status(Status(StatusCode.OK))
        child.end()
    ours = decode(otlp.encode(mem.get_finished_spans()))
    theirs = encode_spans(mem.get_finished_spans())
    for req in (ours, theirs):  # an unset status: the SDK writes an empty one, we write none
        for s in req.resource_spans[0].scope_spans[0].spans:
            if s.status.code == 0 and not s.status.message:
                s.ClearField("status")
    assert str(ours) == str(theirs)


def test_local_child_and_sampling_flags(lite: Any) -> None:
    provider, keep = lite
    tr = provider.get_tracer()
    from opentelemetry import trace

    parent = tr.start_span("route m")
    child = tr.start_span("send x", context=trace.set_span_in_context(parent))
    assert child.get_span_context().trace_id == parent.get_span_context().trace_id
    assert child.parent.span_id == parent.get_span_context().span_id
    assert not child.parent.is_remote
    headers = child.inject({})
    assert tm.parse(headers["traceparent"]).span_id == child.get_span_context().span_id
    child.end()
    parent.end()
    unsampled = tm.parse(TP[:-2] + "00")
    off = tr.start_span("x", context=tm.context_of(unsampled))
    assert not off.is_recording() and off.get_span_context().trace_flags == TraceFlags(0)
    provider.force_flush()
    spans = [
        s
        for b in keep.bodies
        for rs in decode(b).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert [s.name for s in spans] == ["send x", "route m"]
    assert spans[0].flags == 0x100  # local parent


def test_forced_ids_give_the_chain_span_its_intake_ids(lite: Any) -> None:
    provider, _ = lite
    token = tl.forced_ids.set((0xABC, 0xDEF))
    try:
        span = provider.get_tracer().start_span("chain")
    finally:
        tl.forced_ids.reset(token)
    sc = span.get_span_context()
    assert (sc.trace_id, sc.span_id) == (0xABC, 0xDEF)


def test_batcher_drops_beyond_the_queue_and_wakes_on_a_full_batch() -> None:
    sent: list[int] = []
    woke = threading.Event()

    class Exp:
        def send(self, spans: Any) -> bool:
            sent.append(len(spans))
            woke.set()
            return True

        def shutdown(self) -> None:
            pass

    b = tx.SpanBatcher(Exp(), max_queue_size=10, max_export_batch_size=4, schedule_delay_ms=60_000)
    try:
        for i in range(4):
            b.add(i)
        assert woke.wait(5)  # a full batch goes before the schedule delay
        for i in range(12):
            b.add(i)
        assert b.dropped >= 2
        b.force_flush()
        assert sum(sent) + b.dropped == 16
    finally:
        b.shutdown()


def test_exporter_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,Tenant=acme")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "3")
    e = tx.OtlpHttpExporter()
    assert e.endpoint == "http://collector:4318/v1/traces"
    assert e.headers["api-key"] == "a b" and e.headers["tenant"] == "acme"
    assert e.timeout == 3.0 and not e.gzip
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9999/custom")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x=1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.5")
    e = tx.OtlpHttpExporter()
    assert e.endpoint == "http://other:9999/custom"
    assert e.headers["x"] == "1" and "api-key" not in e.headers and e.timeout == 0.5


async def test_exporter_posts_to_an_otlp_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    async with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
        exporter = tx.OtlpHttpExporter()
        provider = tm.build_provider(Resource.create({"service.name": "svc"}), exporter)
        tr = provider.get_tracer()
        for i in range(3):
            tr.start_span(f"s{i}", attributes={"i": i}).end()
        await asyncio.to_thread(provider.force_flush)
        got = await receiver.wait_for(lambda s: len(s) >= 3, 10)
        assert sorted(s.name for s in got) == ["s0", "s1", "s2"]
        assert {s.service for s in got} == {"svc"} and exporter.exported == 3
        await asyncio.to_thread(provider.shutdown)


def test_exporter_reports_an_unreachable_endpoint() -> None:
    e = tx.OtlpHttpExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=0.3)
    assert e.send([]) is True
    span = tl.LiteTracer(tx.SpanBatcher(Keep()), Resource.create({})).start_span("x")
    assert e.send([span]) is False and e.failed == 1


def test_exporter_drops_only_the_span_that_is_not_unicode() -> None:
    keep = Keep()
    provider = tm.build_provider(
        Resource.create({"service.name": "svc"}), keep, schedule_delay_ms=60_000
    )
    tr = provider.get_tracer()
    try:
        tr.start_span("good").end()
        tr.start_span("bad", attributes={"path": "caf\udce9"}).end()
        provider.force_flush()
        e = tx.OtlpHttpExporter(endpoint="http://127.0.0.1:9/v1/traces", timeout=0.01)
        posted: list[bytes] = []
        e.post = lambda body: posted.append(body) or True  # type: ignore[method-assign]
        assert e.send(keep.spans) and e.failed == 1 and e.exported == 1
        assert [s.name for s in only_spans(decode(posted[0]))] == ["good"]
    finally:
        provider.shutdown()


def only_spans(req: ExportTraceServiceRequest) -> list[Any]:
    return [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
