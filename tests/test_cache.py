"""The shared response cache, as deployed: two router processes, two worker processes, one
sandbox provider whose request count tells a hit (no call) from a miss."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from helpers import (
    chain_log,
    recorded_spans,
    running,
    start_cli,
    start_routers,
    stop_all,
    wait_until,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from worker_support import live_workers
from worker_support import toml as one_pool_toml

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainFailed,
    ChainRejected,
    LlmStep,
    Message,
    Params,
    StepCache,
    StepCompleted,
    StepFailed,
    ToolSpec,
    load_config,
)
from chainyard.ledger import audit
from chainyard.router.cache import CACHE_WORKER, bucket_name, request_key
from chainyard.router.engine import Router
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.stack import llm_worker

POOL = "sim"
MAX_ENTRY = 2048


def toml(sandbox_url: str) -> str:
    one_pool = one_pool_toml(sandbox_url, pool=POOL, deployment="d-paid", price=(1000.0, 2000.0))
    return f"{one_pool}\n[cache]\nmax_entry_bytes = {MAX_ENTRY}\n"


def cached_chain(cid: str, text: str, ttl_s: float = 3600, **params: object) -> Chain:
    return Chain(
        id=cid,
        steps=[
            LlmStep(
                id="ask",
                model="m",
                messages=[Message(role="user", content=text)],
                params=Params(max_tokens=2000, **params),  # type: ignore[arg-type]
                cache=StepCache(ttl_s=ttl_s),
            )
        ],
    )


@dataclass
class Stack:
    url: str
    sandbox: SandboxServer
    bus: Bus

    @property
    def calls(self) -> int:
        return self.sandbox.counts["openai.chat"]

    async def run(self, tenant: str, chain: Chain) -> tuple[object, list[object]]:
        """Run a chain for `tenant`: its end and its stored events."""
        async with await Client.connect(self.url, tenant) as c:
            end = await c.run(chain, timeout=30)
        return end, await chain_log(self.bus.js, tenant, chain.id)


def _step_event(events: list[object]) -> StepCompleted | StepFailed:
    steps = [e for e in events if isinstance(e, StepCompleted | StepFailed)]
    assert len(steps) == 1, steps
    return steps[0]


@pytest.fixture
async def stack(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Stack]:
    """2 routers and 2 workers as `chainyard` processes, against one sandbox."""
    procs: list[asyncio.subprocess.Process] = []
    async with SandboxServer(SandboxConfig(capture=0)) as sandbox:
        path = tmp_path / "chainyard.toml"
        path.write_text(toml(sandbox.url))
        cfg = load_config(path)
        bus = await open_bus(nats_server.url, name="t", topology=cfg.topology)
        try:
            procs += await start_routers(tmp_path, nats_server.url, path)
            for i in range(2):
                procs.append(
                    await start_cli(
                        tmp_path / f"worker{i}.log", "worker", "--nats", nats_server.url,
                        "--config", str(path), "--pool", POOL,
                    )
                )  # fmt: skip

            async def workers_up() -> bool:
                return len(await live_workers(bus)) == 2

            await wait_until(workers_up, 30, "both workers' heartbeats")
            yield Stack(url=nats_server.url, sandbox=sandbox, bus=bus)
        finally:
            await stop_all(procs)
            await bus.close()
    logs = "".join((tmp_path / f"router{i}.log").read_text() for i in range(2))
    assert "Traceback" not in logs, logs


async def test_second_chain_hits_without_a_provider_call(stack: Stack) -> None:
    end, events = await stack.run("acme", cached_chain("first", "what is the capital of France"))
    assert isinstance(end, ChainCompleted)
    first = _step_event(events)
    assert isinstance(first, StepCompleted) and not first.cached and first.cost_usd > 0
    assert stack.calls == 1

    # Another chain of the same tenant (its router may be the other replica): no provider call.
    end2, events2 = await stack.run("acme", cached_chain("second", "what is the capital of France"))
    hit = _step_event(events2)
    assert stack.calls == 1
    assert isinstance(hit, StepCompleted) and hit.cached and hit.worker == CACHE_WORKER
    assert hit.cost_usd == 0.0 and hit.saved_usd == pytest.approx(first.cost_usd)
    assert hit.usage.input_tokens == 0 and hit.output.text == first.output.text
    assert isinstance(end2, ChainCompleted)
    assert end2.output.text == end.output.text and end2.cost_usd == 0.0

    # The same request with `stream: true` is served by the same entry (one delta, then the end).
    deltas: list[bytes] = []

    async def on_delta(msg: object) -> None:
        deltas.append(msg.data)  # type: ignore[attr-defined]

    sub = await stack.bus.nc.subscribe("cy.delta.acme.streamed.>", cb=on_delta)
    chain = cached_chain("streamed", "what is the capital of France", stream=True)
    _, events3 = await stack.run("acme", chain)
    assert _step_event(events3).cached and stack.calls == 1  # type: ignore[union-attr]
    await wait_until(lambda: deltas, 5, "the hit's delta")
    await sub.unsubscribe()
    assert deltas == [first.output.text.encode()]

    # Another tenant, same chain id and request: its own miss.
    _, events4 = await stack.run("globex", cached_chain("first", "what is the capital of France"))
    other = _step_event(events4)
    assert isinstance(other, StepCompleted) and not other.cached and stack.calls == 2

    # The ledger of the run: every chain ended once, every step event counted once, each
    # chain's cost the sum of its steps' (a hit's 0 included).
    accepted = [("acme", "first"), ("acme", "second"), ("acme", "streamed"), ("globex", "first")]
    report = await audit(stack.bus.js, accepted)
    assert report.ok and report.completed == 4, report.details()


async def test_an_expired_entry_misses(stack: Stack) -> None:
    text = "a short-lived answer"
    await stack.run("acme", cached_chain("e1", text, ttl_s=0.5))
    assert stack.calls == 1
    key = request_key(cached_chain("x", text, ttl_s=0.5).steps[0], "acme", False)  # type: ignore[arg-type]
    kv = await stack.bus.js.key_value(bucket_name("cy"))
    stored = msgspec.json.decode((await kv.get(key)).value)["stored_at_ms"]
    # The entry is expired once 0.5 s have passed since it was stored (a clock, not a race).
    await asyncio.sleep(max(0.0, stored / 1000 + 0.5 - time.time()) + 0.05)
    _, events = await stack.run("acme", cached_chain("e2", text, ttl_s=0.5))
    assert not _step_event(events).cached and stack.calls == 2  # type: ignore[union-attr]


async def test_a_too_large_answer_is_not_kept(stack: Stack) -> None:
    text = "long " * (MAX_ENTRY // 4)  # the sandbox echoes it: the entry exceeds the cap
    await stack.run("acme", cached_chain("big1", text))
    _, events = await stack.run("acme", cached_chain("big2", text))
    step = _step_event(events)
    assert isinstance(step, StepCompleted) and not step.cached and stack.calls == 2


async def test_a_failure_is_never_cached(stack: Stack) -> None:
    await stack.sandbox.configure(SandboxConfig(capture=0, error_rate=1.0, error_status=400))
    end, events = await stack.run("acme", cached_chain("f1", "this one fails"))
    assert isinstance(end, ChainFailed) and isinstance(_step_event(events), StepFailed)
    await stack.sandbox.configure(SandboxConfig(capture=0))
    end2, events2 = await stack.run("acme", cached_chain("f2", "this one fails"))
    step = _step_event(events2)
    assert isinstance(end2, ChainCompleted) and isinstance(step, StepCompleted)
    assert not step.cached and stack.calls == 2


async def test_identical_steps_at_once_both_complete_then_one_entry_serves(stack: Stack) -> None:
    """No single flight: two identical steps that start before either stored may both call
    the provider (documented); both complete with the same answer and the next one hits."""
    text = "two at once"
    ends = await asyncio.gather(
        stack.run("acme", cached_chain("c1", text)), stack.run("acme", cached_chain("c2", text))
    )
    assert all(isinstance(end, ChainCompleted) for end, _ in ends)
    assert ends[0][0].output.text == ends[1][0].output.text  # type: ignore[attr-defined]
    assert 1 <= stack.calls <= 2
    calls = stack.calls
    _, events = await stack.run("acme", cached_chain("c3", text))
    assert _step_event(events).cached and stack.calls == calls  # type: ignore[union-attr]


async def test_cache_on_an_agent_loop_is_refused(stack: Stack) -> None:
    chain = Chain(
        id="loopy",
        steps=[
            LlmStep(
                id="agent",
                model="m",
                messages=[Message(role="user", content="hi")],
                tools=[ToolSpec(name="t")],
                loop={"tools": ["t"]},  # type: ignore[arg-type]
                cache=StepCache(ttl_s=60),
            )
        ],
    )
    async with await Client.connect(stack.url, "acme") as c:
        end = await c.run(msgspec.json.encode(chain), timeout=30)
    assert isinstance(end, ChainRejected)
    assert "$.steps[0].cache" in [e.path for e in end.errors]  # (no tool `t` is served, too)


def test_the_key_is_the_normalized_request() -> None:
    step = cached_chain("k", "hello", temperature=0.0).steps[0]
    assert isinstance(step, LlmStep)
    streamed = msgspec.structs.replace(
        step, params=msgspec.structs.replace(step.params, stream=True)
    )
    other_ttl = msgspec.structs.replace(step, cache=StepCache(ttl_s=1), id="other")
    key = request_key(step, "acme", False)
    assert request_key(streamed, "acme", False) == key  # kept whole: streaming shares
    assert request_key(other_ttl, "acme", False) == key  # the step's id and ttl are not the request
    assert request_key(step, "globex", False) != key  # tenants apart ...
    assert request_key(step, "globex", True) == request_key(step, "acme", True)  # ... unless shared
    hotter = msgspec.structs.replace(step, params=Params(max_tokens=2000, temperature=0.7))
    assert request_key(hotter, "acme", False) != key
    # Canonical: the same JSON Schema with its keys in another order is the same request.
    a = ToolSpec(name="t", parameters={"type": "object", "properties": {"x": {"type": "string"}}})
    b = ToolSpec(name="t", parameters={"properties": {"x": {"type": "string"}}, "type": "object"})
    with_a = msgspec.structs.replace(step, tools=[a])
    with_b = msgspec.structs.replace(step, tools=[b])
    assert request_key(with_a, "acme", False) == request_key(with_b, "acme", False)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


async def test_a_hit_has_a_cache_span(
    nats_server: NatsServer, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    async with SandboxServer(SandboxConfig(capture=0)) as sandbox:
        path = tmp_path / "chainyard.toml"
        path.write_text(toml(sandbox.url))
        cfg = load_config(path)
        bus = await open_bus(nats_server.url, name="t", topology=cfg.topology)
        try:
            router = Router(bus, cfg)
            worker = llm_worker(bus, cfg, cfg.pools[0], heartbeat_s=0.2)
            async with running(router, worker):
                stack = Stack(url=nats_server.url, sandbox=sandbox, bus=bus)
                await stack.run("acme", cached_chain("t1", "traced"))
                _, events = await stack.run("acme", cached_chain("t2", "traced"))
        finally:
            await bus.close()
    hit = _step_event(events)
    assert isinstance(hit, StepCompleted) and hit.cached and sandbox.counts["openai.chat"] == 1
    cache_spans = [s for s in spans.get_finished_spans() if s.name == "cache m"]
    assert len(cache_spans) == 1
    attrs = cache_spans[0].attributes or {}
    assert attrs["chainyard.cache.hit"] is True and attrs["chainyard.chain.id"] == "t2"
    assert attrs["chainyard.cache.saved_usd"] == pytest.approx(hit.saved_usd)
    calls = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    assert len(calls) == 1  # t1 only
