"""`chainyard demo`: a five-step agent chain on an embedded NATS, answered by a real local model.

classify -> plan -> (weather || search) -> answer. Classify and plan go to the model group
`small` (the local model or the priced cloud simulator, whichever has capacity); the two tools
run in parallel; the local SmolLM2-135M writes the answer.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainEnded,
    ChainFailed,
    ChainRejected,
    Config,
    Deployment,
    LlmStep,
    Loop,
    Message,
    Params,
    PoolConfig,
    Price,
    StepCompleted,
    StepFailed,
    ToolStep,
    new_id,
)
from chainyard.workers.tools import Tools

QUESTION = "Should I cycle to work in Lisbon tomorrow morning?"
AGENT_QUESTION = "What is the weather in Oslo tomorrow? Use the weather tool."

tools = Tools()


@tools.tool
def weather(city: str) -> dict[str, object]:
    """Tomorrow morning's forecast for a city."""
    known = {"lisbon": (17, "light wind, dry"), "oslo": (-3, "snow"), "london": (9, "drizzle")}
    temp, sky = known.get(city.strip().lower(), (15, "mild, dry"))
    return {"city": city, "temp_c": temp, "conditions": sky}


@tools.tool
def search(query: str, limit: int = 2) -> list[str]:
    """Search a small offline knowledge base."""
    kb = [
        "Lisbon has over 200 km of cycle lanes, mostly along the river.",
        "Lisbon's hills are steep; e-bikes are popular for commuting.",
        "Cycling is fastest in Lisbon before 8 am, when traffic is light.",
        "Oslo clears its cycle lanes of snow first.",
    ]
    words = {w.lower().strip("?.,") for w in query.split() if len(w) > 3}
    hits = [d for d in kb if words & {w.lower().strip(".,;'") for w in d.split()}]
    return hits[:limit] or kb[:limit]


def demo_config() -> Config:
    return Config(
        deployments=[
            Deployment(
                name="local-smollm2",
                pool="local",
                model="smollm2",
                context_window=2048,
                capabilities=["tools", "json"],
                price=Price(input_per_mtok=0.0, output_per_mtok=0.0),
            ),
            Deployment(
                name="cloud-sim-4o-mini",
                pool="cloud-sim",
                model="gpt-4o-mini",  # priced from the genai-prices table
                context_window=128_000,
                capabilities=["tools", "json", "streaming"],
            ),
        ],
        groups={"small": ["local-smollm2", "cloud-sim-4o-mini"]},
        pools=[
            PoolConfig(name="local", provider="openai", base_url="local-model", slots=2),
            PoolConfig(name="cloud-sim", provider="openai", base_url="sandbox", slots=64),
        ],
        tools=[t.name for t in tools],
    )


def demo_chain() -> Chain:
    ask = Message(role="user", content=QUESTION)
    return Chain(
        id=f"demo-{new_id()}",
        steps=[
            LlmStep(
                id="classify",
                model="small",
                messages=[
                    Message(
                        role="system", content="Answer with one word: weather, travel or other."
                    ),
                    ask,
                ],
                params=Params(max_tokens=8, temperature=0),
            ),
            LlmStep(
                id="plan",
                model="small",
                messages=[
                    Message(role="system", content="Write a one-line plan to answer the question."),
                    Message(role="user", content=QUESTION + " (topic: {{steps.classify.output}})"),
                ],
                params=Params(max_tokens=40, temperature=0),
            ),
            ToolStep(id="weather", tool="weather", args={"city": "Lisbon"}, after=["plan"]),
            ToolStep(id="search", tool="search", args={"query": QUESTION}, after=["plan"]),
            LlmStep(
                id="answer",
                model="smollm2",
                messages=[
                    Message(
                        role="system",
                        content="You are a helpful assistant. Answer in two short sentences.",
                    ),
                    Message(
                        role="user",
                        content=QUESTION
                        + "\nForecast: {{steps.weather.output}}"
                        + "\nFacts: {{steps.search.output}}",
                    ),
                ],
                params=Params(max_tokens=64, temperature=0),
            ),
        ],
        output="answer",
        deadline_ms=300_000,
    )


def agent_chain() -> Chain:
    """An agent loop on the local model: it calls the weather tool, then answers."""
    return Chain(
        id=f"agent-{new_id()}",
        steps=[
            LlmStep(
                id="agent",
                model="smollm2",
                messages=[
                    Message(role="system", content="You can call tools. Use them, then answer."),
                    Message(role="user", content=AGENT_QUESTION),
                ],
                loop=Loop(tools=["weather"], max_iterations=2),
                params=Params(max_tokens=48, temperature=0),
            )
        ],
        deadline_ms=300_000,
    )


def _table(ended: ChainCompleted | ChainFailed) -> str:
    rows = [("step", "status", "pool", "model", "latency", "tokens in/out", "cost USD")]
    for s in ended.steps:
        rows.append(
            (
                s.step_id,
                s.status,
                s.pool or "-",
                s.model or "-",
                f"{s.latency_ms:.0f} ms" if s.latency_ms is not None else "-",
                f"{s.usage.input_tokens}/{s.usage.output_tokens}",
                f"{s.cost_usd:.6f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


async def _follow(client: Client, chain: Chain, out: TextIO) -> ChainEnded | None:
    """Submit a chain and print each step as it ends; returns the terminal event."""
    await client.submit(chain)
    async for ev in client.watch(chain.id):
        if isinstance(ev, StepCompleted):
            calls = ", ".join(f"{c.name}({c.args})" for c in ev.output.tool_calls)
            what = f" -> calls {calls}" if calls else ""
            print(
                f"  done  {ev.step_id:<11} on {ev.target.pool:<12} {ev.latency_ms:7.0f} ms{what}",
                file=out,
                flush=True,
            )
        elif isinstance(ev, StepFailed):
            print(
                f"  retry {ev.step_id:<11} {ev.error.cls}: {ev.error.message}", file=out, flush=True
            )
        elif isinstance(ev, ChainCompleted | ChainFailed | ChainCancelled | ChainRejected):
            return ev
    return None


def _report(ended: ChainEnded | None, out: TextIO) -> bool:
    if isinstance(ended, ChainRejected):
        print("rejected: " + "; ".join(f"{e.path}: {e.message}" for e in ended.errors), file=out)
        return False
    if not isinstance(ended, ChainCompleted | ChainFailed):
        print(f"chain ended without a result: {ended}", file=out)
        return False
    print("\n" + _table(ended), file=out)
    if isinstance(ended, ChainFailed):
        print(f"\nchain failed: {ended.reason}", file=out)
        return False
    print(
        f"\ntotal: {ended.duration_ms:.0f} ms, {ended.usage.input_tokens}+"
        f"{ended.usage.output_tokens} tokens, ${ended.cost_usd:.6f}",
        file=out,
    )
    print(f"\nA: {ended.output.text.strip()}", file=out)
    return True


async def run_demo(nats_url: str | None = None, out: TextIO = sys.stdout) -> int:
    from chainyard.devstack import DevStack
    from chainyard.sandbox.local_model import unavailable_reason

    if reason := unavailable_reason():
        print(f"the demo needs the local model: {reason}", file=sys.stderr)
        return 2
    print(
        "starting NATS, router, workers, the local model (SmolLM2-135M) ...", file=out, flush=True
    )
    t0 = time.perf_counter()
    async with DevStack(demo_config(), nats_url=nats_url, tools=tools, gateway_port=0) as dev:
        assert dev.bus is not None
        print(f"ready in {time.perf_counter() - t0:.1f} s; NATS at {dev.nats_url}", file=out)
        print(f"HTTP gateway (OpenAI/Anthropic base URL): {dev.gateway_url}/v1", file=out)
        print(f"watch it from another terminal: chainyard top --nats {dev.nats_url}", file=out)
        client = Client(dev.bus.nc, "demo", dev.bus.topology)
        chain = demo_chain()
        print(f"\n1) a chain. Q: {QUESTION}", file=out)
        print(f"   {chain.id}: classify -> plan -> (weather || search) -> answer\n", file=out)
        ok = _report(await _follow(client, chain, out), out)
        agent = agent_chain()
        print(f"\n2) an agent loop on the local model. Q: {AGENT_QUESTION}", file=out)
        print(f"   {agent.id}: the model may call `weather`, then answers\n", file=out)
        ok = _report(await _follow(client, agent, out), out) and ok
    return 0 if ok else 1
