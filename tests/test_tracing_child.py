"""The span export helper process (telemetry_child): what the service pipes to it arrives at an
OTLP receiver as the thread exporter would send it; credentials stay off its command line; a
helper that dies is replaced; the last spans are sent at shutdown."""

from __future__ import annotations

import asyncio
import enum
import os
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from otlp_receiver import OtlpReceiver

from chainyard.runtime import telemetry as tm
from chainyard.runtime import telemetry_child as tc
from chainyard.runtime import telemetry_helper as th
from chainyard.runtime import telemetry_otlp as otlp


class Keep:
    def send(self, spans: Any) -> bool:
        return True

    def shutdown(self) -> None:
        pass


TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _provider(endpoint: str, headers: dict[str, str] | None = None, **batch: Any) -> Any:
    """A provider piping to a helper that posts to `endpoint`; batch settings as given (the
    schedule delay a minute unless said: spans leave by a full batch or a flush)."""
    export = tc.ChildExport(endpoint=f"{endpoint}/v1/traces", headers=headers)
    batch.setdefault("schedule_delay_ms", 60_000)
    return tm.build_provider(Resource.create({"service.name": "svc"}), export, **batch)


def _spans(tracer: Any) -> list[Any]:
    """A message's process span as the consumer wrapper makes it (light: a remote parent, a
    link to it, fixed attributes), one with a link and one with an event and error status (the
    general path), and a root."""
    parent = tm.parse(TP)
    fixed = otlp.Fixed("process cy.work.{pool}", {"messaging.system": "nats"})
    tid, pid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    process = tracer.remote_child(tid, pid, 1, None, 5, fixed, {"n": 1}, True, 1000)
    process.end(end_time=1500)
    light = tracer.start_span(
        "light",
        context=tm.context_of(parent),
        kind=SpanKind.CONSUMER,
        attributes={"s": "text é", "i": 3, "d": 1.5, "ls": ["x", "y"], "b": True},
        links=[Link(parent)],
        start_time=1000,
    )
    light.end(end_time=2000)
    failed = tracer.start_span("chat m", attributes={"gen_ai.request.model": "m"})
    failed.add_event("retry", {"n": 1})
    failed.set_status(Status(StatusCode.ERROR, "boom"))
    failed.end()
    root = tracer.start_span("root")
    root.end()
    return [process, light, failed, root]


def test_records_encode_as_the_spans_do() -> None:
    """The helper's encoder, fed the service's records, writes the bytes `encode` writes."""
    batcher = tc.ChildBatcher(tc.ChildExport(endpoint="http://127.0.0.1:9/v1/traces"))
    provider = tm.build_provider(Resource.create({"service.name": "svc"}), Keep())
    try:
        spans = _spans(provider.get_tracer())
        for s in spans:
            batcher.add(s)
        records = batcher._take(10)
        assert [len(r) for r in records] == [10, 2, 2, 10]  # light, general (2), light
        assert th.encode_records(records) == otlp.encode(spans)
    finally:
        batcher._stop = True  # nothing was sent: no helper to stop
        provider.shutdown()


async def test_the_helper_posts_what_the_service_pipes() -> None:
    async with OtlpReceiver() as receiver:
        provider = _provider(receiver.endpoint, headers={"Authorization": "Bearer sekret-42"})
        try:
            _spans(provider.get_tracer())
            assert await asyncio.to_thread(provider.force_flush, 10_000)
            got = {s.name: s for s in await receiver.wait_for(lambda s: len(s) >= 4, 10)}
            process = got["process cy.work.{pool}"]
            assert process.attrs == {"messaging.system": "nats", "n": 1}
            assert process.links == [("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")]
            light = got["light"]
            assert light.trace_id == "0af7651916cd43dd8448eb211c80319c"
            assert light.parent_id == "b7ad6b7169203331" and light.kind == 5
            assert (light.start_ns, light.end_ns) == (1000, 2000)
            assert light.attrs == {"s": "text é", "i": 3, "d": 1.5, "ls": ["x", "y"], "b": True}
            assert light.links == [("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")]
            assert got["chat m"].status_code == 2 and got["root"].parent_id == ""
            assert {s.service for s in got.values()} == {"svc"}
            assert receiver.last_headers["authorization"] == "Bearer sekret-42"
            b = provider.batcher
            assert (b.exported_spans, b.failed, b.dropped) == (4, 0, 0)
            # the credentials went over the pipe, not on the helper's command line
            assert b._proc is not None
            cmdline = Path(f"/proc/{b._proc.pid}/cmdline")
            assert b"sekret" not in await asyncio.to_thread(cmdline.read_bytes)
        finally:
            await asyncio.to_thread(provider.shutdown)


async def test_a_dead_helper_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "RESPAWN_S", 0.0)
    async with OtlpReceiver() as receiver:
        provider = _provider(receiver.endpoint)
        tracer, b = provider.get_tracer(), provider.batcher
        try:
            tracer.start_span("before").end()
            assert await asyncio.to_thread(provider.force_flush, 10_000)
            first = b._proc
            assert first is not None
            first.kill()
            await asyncio.to_thread(first.wait, 10)
            tracer.start_span("lost").end()  # piped into a broken pipe: dropped and counted
            await asyncio.to_thread(provider.force_flush, 10_000)
            assert b.dropped == 1 and b._proc is None
            tracer.start_span("after").end()
            assert await asyncio.to_thread(provider.force_flush, 10_000)
            assert b._proc is not None and b._proc.pid != first.pid
            names = {s.name for s in await receiver.wait_for(lambda s: len(s) >= 2, 10)}
            assert {"before", "after"} <= names
        finally:
            await asyncio.to_thread(provider.shutdown)


async def test_shutdown_sends_the_last_spans_and_plain_values() -> None:
    class Provider(enum.StrEnum):  # a str subclass: marshal refuses it, it is sent as a str
        OPENAI = "openai"

    async with OtlpReceiver() as receiver:
        provider = _provider(receiver.endpoint)
        span = provider.get_tracer().start_span("last", attributes={"p": Provider.OPENAI})
        span.end()
        await asyncio.to_thread(provider.shutdown)
        (got,) = await receiver.wait_for(lambda s: len(s) >= 1, 10)
        assert got.name == "last" and got.attrs == {"p": "openai"}
        proc = provider.batcher._proc
        assert proc is None  # stopped and reaped


async def test_a_full_batch_is_piped_without_a_flush() -> None:
    """Batches leave the service as they fill; nothing waits for the schedule delay."""
    async with OtlpReceiver() as receiver:
        provider = _provider(receiver.endpoint, schedule_delay_ms=600_000, max_export_batch_size=4)
        try:
            tracer = provider.get_tracer()
            for i in range(8):
                tracer.start_span(f"s{i}").end()
            got = await receiver.wait_for(lambda s: len(s) >= 8, 10)
            assert sorted(s.name for s in got) == [f"s{i}" for i in range(8)]
            assert receiver.requests == 2
        finally:
            await asyncio.to_thread(provider.shutdown)


def test_forked_children_start_their_own_helper() -> None:
    provider = tm.build_provider(Resource.create({"service.name": "svc"}), tc.ChildExport())
    try:
        pid = os.fork()
        if pid == 0:  # the child must not write into its parent's helper
            os._exit(0 if provider.batcher._proc is None and not provider.batcher._records else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        provider.shutdown()


def test_the_export_thread_is_one_setting_away(monkeypatch: pytest.MonkeyPatch) -> None:
    from chainyard.runtime.telemetry_export import OtlpHttpExporter, SpanBatcher

    res = Resource.create({"service.name": "svc"})
    monkeypatch.setenv("CHAINYARD_TRACE_EXPORT", "thread")
    threaded = tm.build_provider(res)
    monkeypatch.delenv("CHAINYARD_TRACE_EXPORT")
    default = tm.build_provider(res)
    try:
        assert type(threaded.batcher) is SpanBatcher
        assert type(threaded.batcher.exporter) is OtlpHttpExporter
        assert type(default.batcher) is tc.ChildBatcher
    finally:
        threaded.shutdown()
        default.shutdown()


async def test_a_partial_batch_leaves_after_the_schedule_delay() -> None:
    async with OtlpReceiver() as receiver:
        provider = _provider(receiver.endpoint, schedule_delay_ms=100)
        try:
            provider.get_tracer().start_span("alone").end()  # one span of a 512-span batch
            (got,) = await receiver.wait_for(lambda s: len(s) >= 1, 10)  # no flush asked
            assert got.name == "alone"
        finally:
            await asyncio.to_thread(provider.shutdown)


def test_a_helper_that_cannot_start_drops_spans_and_fails_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tc.sys, "executable", "/nonexistent/python")
    provider = tm.build_provider(
        Resource.create({"service.name": "svc"}),
        tc.ChildExport(endpoint="http://127.0.0.1:9/v1/traces"),
        max_export_batch_size=2,
    )
    try:
        tracer = provider.get_tracer()
        for i in range(4):
            tracer.start_span(f"s{i}").end()  # a full batch: the helper is started, and fails
        assert provider.batcher.dropped == 4 and provider.batcher._proc is None
        assert "cannot start the span export helper" in caplog.text
    finally:
        provider.shutdown()


async def test_strings_that_are_not_unicode_are_replaced_or_dropped_never_raised() -> None:
    async with OtlpReceiver() as receiver:
        provider = _provider(receiver.endpoint)
        tracer = provider.get_tracer()
        try:
            # light: sent with U+FFFD; beyond the common case: dropped and counted
            tracer.start_span("light", attributes={"path": "caf\udce9"}).end()
            bad = tracer.start_span("status")
            bad.set_status(Status(StatusCode.ERROR, "caf\udce9"))
            bad.end()
            tracer.start_span("after").end()
            assert await asyncio.to_thread(provider.force_flush, 10_000)
            got = {s.name: s for s in await receiver.wait_for(lambda s: len(s) >= 2, 10)}
            assert got["light"].attrs == {"path": "caf\ufffd"} and "after" in got
            assert "status" not in got and provider.batcher.dropped == 1
        finally:
            await asyncio.to_thread(provider.shutdown)


async def test_a_stalled_helper_never_blocks_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the helper stopped, ending spans fills the pipe, then the bytes kept back, then
    whole batches are dropped and counted; once it runs again, the rest arrives."""
    import signal

    monkeypatch.setattr(tc, "MAX_PENDING", 1 << 20)
    async with OtlpReceiver() as receiver:
        provider = _provider(
            receiver.endpoint,
            schedule_delay_ms=600_000,
            max_export_batch_size=64,
            max_queue_size=64,
        )
        tracer, b = provider.get_tracer(), provider.batcher
        big = "x" * 4096  # ~260 KB a batch (each value its own: marshal sends a repeat once)
        try:
            tracer.start_span("first").end()
            assert await asyncio.to_thread(provider.force_flush, 10_000)
            assert b._proc is not None
            os.kill(b._proc.pid, signal.SIGSTOP)
            try:
                for i in range(64 * 40):  # 40 batches, ~10 MB: far beyond what is kept
                    tracer.start_span("s", attributes={"big": f"{i}{big}"}).end()
                assert b.dropped > 0 and len(b._pending) > 0
            finally:
                os.kill(b._proc.pid, signal.SIGCONT)
            assert await asyncio.to_thread(provider.force_flush, 30_000)
            got = await receiver.wait_for(lambda s: len(s) >= 1 + 64 * 40 - b.dropped, 30)
            assert len(got) + b.dropped == 1 + 64 * 40
        finally:
            await asyncio.to_thread(provider.shutdown)
