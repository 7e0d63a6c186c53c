"""Tracing is configured by the standard `OTEL_*` variables, as OpenTelemetry documents them.

Each test starts processes with only those variables set (nothing chainyard-specific) against a
real nats-server: the console exporter prints spans, a ratio sampler samples, the propagators
named by `OTEL_PROPAGATORS` carry baggage across a hop, and `chainyard dev` with an OTLP endpoint
exports one trace per chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from helpers import heartbeats_from, wait_until
from otlp_receiver import OtlpGrpcReceiver, OtlpReceiver, Span

from chainyard.client import Client
from chainyard.contracts import Chain, ChainCompleted, LlmStep, Message, ToolStep
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import local_model

PROBE = Path(__file__).with_name("tracing_probe.py")
SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def otel_env(**otel: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(PYTHONUNBUFFERED="1", **otel)
    return env


async def probe(url: str, what: str, arg: str, **otel: str) -> tuple[list[dict[str, Any]], str]:
    """Run the probe; (the spans the console exporter printed, its stderr)."""
    p = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        url,
        what,
        arg,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=otel_env(**otel),
    )
    out, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode == 0, err.decode()
    return console_spans(out.decode()), err.decode()


def console_spans(text: str) -> list[dict[str, Any]]:
    """ConsoleSpanExporter writes one indented JSON object per span."""
    dec, spans, i = json.JSONDecoder(), [], 0
    while (i := _skip_ws(text, i)) < len(text):
        obj, i = dec.raw_decode(text, i)
        spans.append(obj)
    return spans


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


async def test_console_exporter_prints_spans(nats_server: NatsServer) -> None:
    spans, _ = await probe(
        nats_server.url,
        "roots",
        "3",
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="probe-svc",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test",
    )
    assert [s["name"] for s in spans] == ["send cy.work.{pool}"] * 3
    s = spans[0]
    assert s["kind"] == "SpanKind.PRODUCER"
    assert s["attributes"]["messaging.system"] == "nats"
    assert s["attributes"]["messaging.destination.name"] == "cy.work.probe"
    assert s["resource"]["attributes"]["service.name"] == "probe-svc"
    assert s["resource"]["attributes"]["deployment.environment.name"] == "test"


async def test_default_service_name_and_off_without_exporter(nats_server: NatsServer) -> None:
    spans, _ = await probe(nats_server.url, "roots", "1", OTEL_TRACES_EXPORTER="console")
    assert spans[0]["resource"]["attributes"]["service.name"] == "chainyard-probe"
    # no exporter and no endpoint: off; OTEL_SDK_DISABLED wins over an exporter
    assert (await probe(nats_server.url, "roots", "2"))[0] == []
    disabled = await probe(
        nats_server.url, "roots", "2", OTEL_TRACES_EXPORTER="console", OTEL_SDK_DISABLED="true"
    )
    assert disabled[0] == []


async def test_an_applications_own_provider_is_used_as_is(nats_server: NatsServer) -> None:
    spans, _ = await probe(nats_server.url, "roots", "2", PROBE_OWN_PROVIDER="1")
    assert [s["name"] for s in spans] == ["send cy.work.{pool}"] * 2
    assert spans[0]["resource"]["attributes"]["service.name"] == "my-app"


@pytest.mark.parametrize("protocol", ["", "http/protobuf", "grpc"])
async def test_otlp_exporter_by_protocol(nats_server: NatsServer, protocol: str) -> None:
    """`otlp` is OTLP/HTTP unless OTEL_EXPORTER_OTLP_PROTOCOL says grpc (the grpc extra)."""
    if protocol == "grpc":
        pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
    receiver = OtlpGrpcReceiver() if protocol == "grpc" else OtlpReceiver()
    async with receiver:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        if protocol:
            otel["OTEL_EXPORTER_OTLP_PROTOCOL"] = protocol
        await probe(nats_server.url, "roots", "3", **otel)
        spans = await receiver.wait_for(lambda s: len(s) >= 3, timeout=10)
    assert [s.name for s in spans] == ["send cy.work.{pool}"] * 3
    assert {s.service for s in spans} == {"chainyard-probe"}


async def test_an_exporter_that_is_not_installed_is_an_error_at_start(
    nats_server: NatsServer,
) -> None:
    p = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROBE),
        nats_server.url,
        "roots",
        "1",
        stderr=asyncio.subprocess.PIPE,
        env=otel_env(OTEL_TRACES_EXPORTER="zipkin_json"),
    )
    _, err = await asyncio.wait_for(p.communicate(), 60)
    assert p.returncode != 0
    assert "OTEL_TRACES_EXPORTER=zipkin_json: no span exporter 'zipkin_json'" in err.decode()


@pytest.mark.parametrize(
    ("sampler", "arg", "low", "high"),
    [
        ("traceidratio", "0.0", 0, 0),
        ("traceidratio", "1.0", 200, 200),
        ("parentbased_traceidratio", "0.5", 40, 160),  # binomial(200, 0.5): 100 +- 60 (8.5 sd)
    ],
)
async def test_ratio_sampler_samples_new_traces(
    nats_server: NatsServer, sampler: str, arg: str, low: int, high: int
) -> None:
    spans, _ = await probe(
        nats_server.url,
        "roots",
        "200",
        OTEL_TRACES_EXPORTER="console",
        OTEL_TRACES_SAMPLER=sampler,
        OTEL_TRACES_SAMPLER_ARG=arg,
    )
    assert low <= len(spans) <= high, len(spans)


@pytest.mark.parametrize("flags", ["01", "00"])
async def test_parentbased_ratio_follows_the_parent_across_a_hop(
    nats_server: NatsServer, flags: str
) -> None:
    """At ratio 0 only a sampled parent gets spans; the onward message keeps the decision."""
    spans, err = await probe(
        nats_server.url,
        "hop",
        SAMPLED[:-2] + flags,
        OTEL_TRACES_EXPORTER="console",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.0",
    )
    onward = json.loads(err)["onward"]
    assert onward["traceparent"].split("-")[1] == SAMPLED.split("-")[1]
    assert onward["traceparent"].endswith(flags)
    names = sorted(s["name"] for s in spans)
    if flags == "01":
        assert names == ["execute_tool probe"]  # the consumer and its publish: no span of their own
        (call,) = spans
        assert call["parent_id"] == "0x" + SAMPLED.split("-")[2]
        assert call["attributes"]["messaging.destination.name"] == "cy.work.hop"
    else:
        assert names == []
        assert onward["traceparent"] == SAMPLED[:-2] + flags  # forwarded as it came


async def test_a_sampler_that_ignores_the_parent_still_decides_under_a_sampled_out_one(
    nats_server: NatsServer,
) -> None:
    """Spans under a sampled-out parent are skipped only for parent-based samplers."""
    spans, _ = await probe(
        nats_server.url,
        "hop",
        SAMPLED[:-2] + "00",
        OTEL_TRACES_EXPORTER="console",
        OTEL_TRACES_SAMPLER="always_on",
    )
    names = sorted(s["name"] for s in spans)
    assert names == ["execute_tool probe"]  # its onward publish has no span of its own


@pytest.mark.parametrize("propagators", ["tracecontext,baggage", "tracecontext"])
async def test_otel_propagators_carry_baggage_across_a_hop(
    nats_server: NatsServer, propagators: str
) -> None:
    _, err = await probe(
        nats_server.url,
        "hop",
        SAMPLED,
        OTEL_TRACES_EXPORTER="console",
        OTEL_PROPAGATORS=propagators,
    )
    got = json.loads(err)
    assert got["onward"]["traceparent"].split("-")[1] == SAMPLED.split("-")[1]
    if "baggage" in propagators:
        assert got["first"]["baggage"] == "tier=gold"
        assert got["seen"]["tier"] == "gold"  # the handler's context has it
        assert got["onward"]["baggage"] == "tier=gold"  # and the next hop gets it
    else:
        assert "baggage" not in got["first"] and "baggage" not in got["onward"]
        assert got["seen"]["tier"] is None


def dev_chain(i: int) -> Chain:
    return Chain(
        id=f"dev-traced-{i}",
        steps=[
            ToolStep(id="weather", tool="weather", args={"city": "Lisbon"}),
            LlmStep(
                id="answer",
                model="gpt-4o-mini",
                messages=[Message(role="user", content="{{steps.weather.output}}")],
            ),
        ],
    )


async def test_chainyard_dev_with_an_otlp_endpoint_exports_one_trace_per_chain(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """`chainyard dev` (what `chainyard demo` runs in) traces from the OTEL_* variables."""
    n = 3
    async with OtlpReceiver() as receiver:
        log = tmp_path / "dev.log"
        with log.open("wb") as out:
            dev = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "chainyard.cli",
                "dev",
                "--no-local",
                "--nats",
                nats_server.url,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=otel_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint),
            )
        bus = await open_bus(nats_server.url, name="t")
        try:
            pools = ("cloud-sim", "tool.weather")
            await wait_until(
                lambda: heartbeats_from(bus.capacity, pools), 60, "the dev stack's workers"
            )
            client = Client(bus.nc, "acme")
            ended = await asyncio.gather(*(client.run(dev_chain(i), timeout=60) for i in range(n)))
            assert all(isinstance(e, ChainCompleted) for e in ended), ended

            def chains_done(spans: list[Span]) -> bool:
                return (
                    sum(s.name == "chain" for s in spans) >= n
                    and sum(s.name == "chat gpt-4o-mini" for s in spans) >= n
                )

            spans = await receiver.wait_for(chains_done, timeout=30)
        finally:
            await bus.close()
            dev.terminate()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(dev.wait(), 15)
            if dev.returncode is None:
                dev.kill()
    traces: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        traces[s.trace_id].append(s)
    assert len(traces) == n, {t: sorted({s.name for s in ss}) for t, ss in traces.items()}
    for ss in traces.values():
        (chain,) = [s for s in ss if s.name == "chain"]
        assert chain.attrs["chainyard.chain.outcome"] == "completed"
        ids = {s.span_id for s in ss}
        assert [s.name for s in ss if not s.parent_id] == ["chain"]  # no client span: a root
        assert all(not s.parent_id or s.parent_id in ids for s in ss)
        assert {"execute_tool weather", "chat gpt-4o-mini"} <= {s.name for s in ss}
    assert {s.service for s in spans} == {"chainyard-dev"}


@pytest.mark.localmodel
@pytest.mark.skipif(
    not local_model.available(), reason=f"local model: {local_model.unavailable_reason()}"
)
async def test_make_demo_with_an_otlp_endpoint_exports_one_trace_per_chain(
    tmp_path: Path,
) -> None:
    """`make demo` is `chainyard demo`: its two chains are two traces, rooted at its client."""
    async with OtlpReceiver() as receiver:
        demo = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chainyard.cli",
            "demo",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=otel_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint),
        )
        out, _ = await asyncio.wait_for(demo.communicate(), 600)
        assert demo.returncode == 0, out.decode()
        # the demo flushes its spans before it exits: all are here
        spans = list(receiver.spans)
    traces: dict[str, list[Span]] = defaultdict(list)
    for s in spans:
        traces[s.trace_id].append(s)
    assert len(traces) == 2, {t: sorted({s.name for s in ss}) for t, ss in traces.items()}
    for ss in traces.values():
        assert [s.name for s in ss if not s.parent_id] == ["send cy.submit.{tenant}"]
        assert sum(s.name == "chain" for s in ss) == 1
        ids = {s.span_id for s in ss}
        assert all(not s.parent_id or s.parent_id in ids for s in ss)
