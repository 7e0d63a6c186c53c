"""The gateway continues the caller's trace: its request span is a child of the caller's
`traceparent`, and the chain's spans (routing, the provider call) follow in the same trace.
Router, worker and gateway run in this process with an in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from helpers import recorded_spans, wait_until
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from chainyard.demo import demo_config, tools
from chainyard.devstack import DevStack
from chainyard.sandbox import SandboxConfig

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans(chain_ids=False) as exporter:
        yield exporter


async def test_caller_trace_continues_through_the_chain(spans: InMemorySpanExporter) -> None:
    stack = DevStack(
        demo_config(), local_model=False, tools=tools, sandbox=SandboxConfig(), gateway_port=0
    )
    async with stack as dev, httpx.AsyncClient(base_url=dev.gateway_url, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions",
            headers={"traceparent": f"00-{TRACE}-{PARENT}-01"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "trace me"}]},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-chainyard-trace-id"] == TRACE

        def names_in_trace() -> set[str]:
            return {
                s.name for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE
            }

        await wait_until(lambda: "chat gpt-4o-mini" in names_in_trace(), 10, "the provider span")
    [request] = [s for s in spans.get_finished_spans() if s.name == "POST /v1/chat/completions"]
    assert request.parent is not None and f"{request.parent.span_id:016x}" == PARENT
    assert f"{request.context.trace_id:032x}" == TRACE
