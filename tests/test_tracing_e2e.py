"""One chain, one trace, end to end: router and workers as separate processes exporting OTLP.

A client span in this process submits a chain (a tool step, then an LLM step whose cheapest
deployment answers 500 every time, so the step fails over to the other pool). The router and
two worker processes export their spans over OTLP/HTTP to a receiver in this test. Asserted:
one trace id, no orphan span, a parent path from the client's span to every provider call, the
semantic-convention attribute names, and no prompt text.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path

import httpx
import pytest
from helpers import free_port, heartbeats_from, stop_all, wait_until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_receiver import OtlpReceiver, Span

from chainyard import trace_view
from chainyard.client import Client
from chainyard.contracts import Chain, ChainCompleted, LlmStep, Message, ToolStep
from chainyard.runtime import tracing
from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

TENANT = "acme"
SECRET = "SECRET-PROMPT-TEXT"


def toml(good_url: str, bad_url: str) -> str:
    return f"""
strategy = "cheapest"
max_attempts = 3
tools = ["weather"]

[[deployments]]
name = "bad-d"
pool = "bad"
model = "m"
price = {{ input_per_mtok = 0.0, output_per_mtok = 0.0 }}

[[deployments]]
name = "good-d"
pool = "good"
model = "m"
price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}

[[pools]]
name = "bad"
provider = "openai"
base_url = "{bad_url}/v1"
slots = 4
timeout_s = 30

[[pools]]
name = "good"
provider = "openai"
base_url = "{good_url}/v1"
slots = 4
timeout_s = 30
"""


async def start(
    args: list[str], log: Path, endpoint: str, **otel: str
) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        PYTHONUNBUFFERED="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRIC_EXPORT_INTERVAL="500",
        CHAINYARD_TRACE_SETTLE="true",  # ack spans too (off by default)
        **otel,
    )
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "chainyard.cli",
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )


def chain() -> Chain:
    return Chain(
        id="traced-1",
        steps=[
            ToolStep(id="weather", tool="weather", args={"city": "Lisbon"}),
            LlmStep(
                id="answer",
                model="m",
                messages=[Message(role="user", content=f"{SECRET} {{{{steps.weather.output}}}}")],
            ),
        ],
    )


def ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    path = [span]
    while path[-1].parent_id:
        path.append(by_id[path[-1].parent_id])
    return path


def complete(spans: list[Span], local_ids: set[str]) -> bool:
    ids = {s.span_id for s in spans} | local_ids
    names = [s.name for s in spans]
    return (
        "chain" in names
        and sum(n == "chat m" for n in names) >= 2
        and "execute_tool weather" in names
        and all(not s.parent_id or s.parent_id in ids for s in spans)
    )


async def test_one_chain_is_one_trace_across_processes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    local = InMemorySpanExporter()  # the client's own spans (this process)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(local))
    tracing.enable(provider, capture=False)
    procs: list[asyncio.subprocess.Process] = []
    metrics_port = free_port()
    try:
        async with (
            OtlpReceiver() as receiver,
            SandboxServer(SandboxConfig(latency_ms=5)) as good,
            SandboxServer(SandboxConfig(error_rate=1.0, error_status=500)) as bad,
        ):
            cfg = tmp_path / "chainyard.toml"
            cfg.write_text(toml(good.url, bad.url))
            base = ["--nats", nats_server.url, "--config", str(cfg)]
            procs.append(await start(["router", *base], tmp_path / "router.log", receiver.endpoint))
            procs.append(
                await start(
                    [
                        "worker",
                        *base,
                        "--pool",
                        "bad",
                        "--pool",
                        "good",
                        "--metrics-port",
                        str(metrics_port),
                    ],
                    tmp_path / "llm.log",
                    receiver.endpoint,
                )
            )
            procs.append(
                await start(
                    ["worker", *base, "--tools", "chainyard.demo:tools"],
                    tmp_path / "tools.log",
                    receiver.endpoint,
                )
            )
            bus = await open_bus(nats_server.url, name="t")
            try:
                pools = ("bad", "good", "tool.weather")
                await wait_until(
                    lambda: heartbeats_from(bus.capacity, pools), 60, "every worker's heartbeat"
                )
                client = Client(bus.nc, TENANT)
                with provider.get_tracer("test").start_as_current_span("client request") as root:
                    ended = await client.run(chain(), timeout=60)
                assert isinstance(ended, ChainCompleted), ended
                local_ids = {f"{x.context.span_id:016x}" for x in local.get_finished_spans()}
                received = await receiver.wait_for(lambda s: complete(s, local_ids), timeout=30)
                out = io.StringIO()
                code = await trace_view.run(
                    "traced-1",
                    nats_url=nats_server.url,
                    tenant=TENANT,
                    jaeger=receiver.endpoint,
                    out=out,
                )
                async with httpx.AsyncClient() as http:
                    scraped = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            finally:
                await bus.close()
            want = {"chainyard.steps.routed", "chainyard.steps.completed"}
            await wait_until(lambda: want <= receiver.metric_names, 15, "OTLP metrics")
            metric_names = set(receiver.metric_names)
    finally:
        tracing.disable()
        await stop_all(procs)

    mine = [
        Span(
            service="client",
            name=s.name,
            kind=0,
            trace_id=f"{s.context.trace_id:032x}",
            span_id=f"{s.context.span_id:016x}",
            parent_id=f"{s.parent.span_id:016x}" if s.parent else "",
            start_ns=s.start_time,
            end_ns=s.end_time,
            attrs=dict(s.attributes),
            links=[],
            status_code=0,
        )
        for s in local.get_finished_spans()
    ]
    spans = mine + received
    by_id = {s.span_id: s for s in spans}
    root_id = f"{root.get_span_context().span_id:016x}"

    # one trace, no orphan, one root: the client's span
    assert {s.trace_id for s in spans} == {f"{root.get_span_context().trace_id:032x}"}
    orphans = [f"{s.service}:{s.name}" for s in spans if s.parent_id and s.parent_id not in by_id]
    assert orphans == []
    assert [s.name for s in spans if not s.parent_id] == ["client request"]

    # every provider call and tool call descends from the client's span
    calls = [s for s in spans if s.name.startswith(("chat ", "execute_tool "))]
    assert len(calls) == 3
    for c in calls:
        path = ancestors(c, by_id)
        assert path[-1].span_id == root_id
        assert path[1].name in ("chain", "execute_tool weather", "chat m"), path  # its cause
    assert {s.service for s in received} == {"chainyard-router", "chainyard-worker"}

    # messaging: the client's send span; no process span (a worker's call span is its message's
    # consumer, with the messaging attributes), no send span from a handler (the handler's
    # context is its producer), no routing span (the call span records its routing decision)
    named = {s.name for s in spans}
    assert {"send cy.submit.{tenant}", "ack cy.work.{pool}"} <= named
    assert not [n for n in named if n.startswith(("process ", "route "))]
    assert not [n for n in named if n.startswith("send ") and n != "send cy.submit.{tenant}"]
    for s in spans:
        if s.name.split(" ")[0] in ("send", "ack", "chat", "execute_tool"):
            assert s.attrs["messaging.system"] == "nats", s.name
            assert s.attrs["messaging.operation.type"] in ("send", "process", "settle")
            assert s.attrs["messaging.destination.name"].startswith("cy.")
    for c in calls:
        assert c.attrs["messaging.destination.name"].startswith("cy.work.")
        assert c.attrs["messaging.consumer.group.name"]
        assert c.attrs["messaging.message.id"].startswith(f"{TENANT}.traced-1.")

    # GenAI spans: the failed call, then the failover's answer
    chats = sorted((s for s in calls if s.name == "chat m"), key=lambda s: s.start_ns)
    failed, answered = chats
    for c in chats:
        assert c.attrs["gen_ai.operation.name"] == "chat"
        assert c.attrs["gen_ai.provider.name"] == "openai"
        assert c.attrs["gen_ai.request.model"] == "m"
    assert failed.attrs["error.type"] == "500" and failed.attrs["chainyard.deployment"] == "bad-d"
    assert answered.attrs["chainyard.deployment"] == "good-d"
    assert answered.attrs["gen_ai.response.model"]
    assert answered.attrs["gen_ai.usage.input_tokens"] > 0
    assert answered.attrs["gen_ai.usage.output_tokens"] > 0
    assert answered.attrs["gen_ai.response.finish_reasons"] == ["stop"]
    tool = next(s for s in calls if s.name == "execute_tool weather")
    assert tool.attrs["gen_ai.tool.name"] == "weather"

    # routing decisions, on the calls they sent
    first, second = failed.attrs, answered.attrs
    assert first["messaging.message.id"] == f"{TENANT}.traced-1.answer.1"
    assert sorted(first["chainyard.route.candidates"]) == ["bad-d", "good-d"]
    assert first["chainyard.route.reason"] == "strategy cheapest"
    assert second["messaging.message.id"] == f"{TENANT}.traced-1.answer.2"
    assert second["chainyard.route.reason"] == "failover from bad-d after retryable"
    assert second["chainyard.route.tried"] == ["bad-d"]
    assert "chainyard.route.estimated_cost_usd" in second
    assert tool.attrs["chainyard.route.reason"] == "only candidate"

    # the chain's own span: under the client's submit, covering the chain, with its totals
    (ch,) = [s for s in spans if s.name == "chain"]
    assert by_id[ch.parent_id].name == "send cy.submit.{tenant}"
    assert ch.attrs["chainyard.chain.outcome"] == "completed"
    assert ch.attrs["chainyard.chain.cost_usd"] == pytest.approx(ended.cost_usd)
    assert ch.attrs["chainyard.chain.output_tokens"] == ended.usage.output_tokens
    assert tool.parent_id == ch.span_id
    # each later call hangs under the call whose event caused it: failover stays visible
    assert failed.parent_id == tool.span_id
    assert answered.parent_id == failed.span_id
    assert ch.end_ns >= answered.end_ns

    # no prompt or completion text anywhere by default
    assert not any(SECRET in str(v) for s in spans for v in s.attrs.values())

    # the waterfall, from the event log and from the (Jaeger-shaped) trace API
    text = out.getvalue()
    print(text)  # docs/TRACING.md shows a run of this
    assert code == 0, text
    for needle in (
        "weather #1",
        "answer #1",
        "answer #2",
        "bad-d: retryable 500",
        "chat m",
        "execute_tool weather",
        "deployment=good-d",
    ):
        assert needle in text, (needle, text)

    # metrics: Prometheus scrape of the LLM worker, OTLP metrics from every service
    failed_line = (
        'chainyard_steps_failed_total{deployment="bad-d",error_class="retryable",pool="bad"}'
    )
    assert f"{failed_line} 1.0" in scraped
    assert 'chainyard_steps_completed_total{deployment="good-d",pool="good"} 1.0' in scraped
    assert {"chainyard.steps.routed", "chainyard.steps.completed"} <= metric_names


async def test_sampled_out_chains_export_nothing_across_replicas(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Two routers, two LLM workers, `parentbased_traceidratio` 0.5, two tenants reusing the
    same chain ids: each sampled chain is one whole trace (chain -> chat); a
    sampled-out chain exports no span at all, in any process."""
    procs: list[asyncio.subprocess.Process] = []
    ids = [f"same-{i}" for i in range(12)]
    tenants = ("acme", "beta")
    try:
        async with (
            OtlpReceiver() as receiver,
            SandboxServer(SandboxConfig(latency_ms=2)) as good,
        ):
            cfg = tmp_path / "chainyard.toml"
            cfg.write_text(toml(good.url, good.url))  # both pools answer
            base = ["--nats", nats_server.url, "--config", str(cfg)]
            ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}
            ratio["OTEL_TRACES_SAMPLER_ARG"] = "0.5"
            for i in range(2):
                procs.append(
                    await start(
                        ["router", *base], tmp_path / f"r{i}.log", receiver.endpoint, **ratio
                    )
                )
                procs.append(
                    await start(
                        ["worker", *base, "--pool", "bad", "--pool", "good"],
                        tmp_path / f"w{i}.log",
                        receiver.endpoint,
                        **ratio,
                    )
                )
            bus = await open_bus(nats_server.url, name="t")
            try:
                await wait_until(
                    lambda: heartbeats_from(bus.capacity, ("bad", "good")), 60, "heartbeats"
                )

                async def run(tenant: str, chain_id: str) -> None:
                    step = LlmStep(id="s", model="m", messages=[Message(role="user", content="hi")])
                    ended = await Client(bus.nc, tenant).run(
                        Chain(id=chain_id, steps=[step]), timeout=60
                    )
                    assert isinstance(ended, ChainCompleted), ended

                await asyncio.gather(*(run(t, c) for t in tenants for c in ids))
            finally:
                await bus.close()
            await stop_all(procs)  # each service flushes its spans on the way out
            spans = list(receiver.spans)
    finally:
        await stop_all(procs)

    by_trace: dict[str, list[Span]] = {}
    for sp in spans:
        by_trace.setdefault(sp.trace_id, []).append(sp)
    chains = [sp for sp in spans if sp.name == "chain"]
    traced = {(c.attrs["chainyard.tenant"], c.attrs["chainyard.chain.id"]) for c in chains}
    assert len(traced) == len(chains)  # one chain span a chain, whichever replica ended it
    assert 0 < len(chains) < len(tenants) * len(ids), len(chains)  # ratio 0.5 of 24 chains
    assert len(by_trace) == len(chains)  # no span of a sampled-out chain, anywhere
    for ss in by_trace.values():
        names = sorted(sp.name for sp in ss if not sp.name.startswith("ack "))
        assert names == ["chain", "chat m"], names
        ids_here = {sp.span_id for sp in ss}
        assert all(not sp.parent_id or sp.parent_id in ids_here for sp in ss)
