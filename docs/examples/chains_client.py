"""The Python client examples of docs/CHAINS.md, run end to end: a one-step chain's quick
answer, follow a chain's events, release a wait step with a signal, cancel a chain, replay a
chain from a step.

Start a stack (`chainyard dev --no-local`), then `python docs/examples/chains_client.py`; it
connects to CHAINYARD_NATS, else nats://127.0.0.1:4222 (what `chainyard dev` prints).
"""

from __future__ import annotations

import asyncio
import os

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCancelled,
    ChainEnded,
    ControlAccepted,
    ControlRejected,
    LlmStep,
    Message,
    Params,
    StepCompleted,
    StepOverride,
    ToolStep,
    WaitStep,
    new_id,
)


async def follow(client: Client, chain: Chain) -> dict[str, str]:
    streamed: dict[str, str] = {}
    await client.submit(chain)
    async for ev in client.watch(chain.id, deltas=True):
        if isinstance(ev, tuple):
            step_id, text = ev  # a fragment of a streaming step (`params.stream: true`)
            streamed[step_id] = streamed.get(step_id, "") + text
        elif isinstance(ev, StepCompleted):
            print(ev.step_id, ev.target.pool, f"{ev.latency_ms:.0f} ms")
    return streamed  # best effort: fragments may be missed, the events never are


async def quick_answer(client: Client, question: str) -> str:
    chain = Chain(
        id=new_id(),  # `answer` needs an id made for the call
        steps=[
            LlmStep(id="q", model="gpt-4o-mini", messages=[Message(role="user", content=question)])
        ],
    )
    got = await client.answer(chain, timeout=60)
    if isinstance(got, StepCompleted):  # stored; `chain.completed` follows with the same output
        return got.output.text
    raise RuntimeError(f"{type(got).__name__}: {getattr(got, 'reason', '')}")  # failed, rejected


async def approve(client: Client, chain_id: str) -> None:
    answer = await client.signal(chain_id, "approval", {"approved": True, "by": "ana"})
    if not isinstance(answer, ControlAccepted):  # the router refused, and says why
        raise RuntimeError(answer.message)


async def stop(client: Client, chain_id: str) -> None:
    answer = await client.cancel(chain_id, reason="the customer withdrew")
    print(answer.message)  # "cancelled", or why not: "chain '...' already ended (completed)"


async def retry_answer(client: Client, chain_id: str) -> ChainEnded | ControlRejected:
    # the new chain's terminal event (without `wait`, its id), or the router's refusal
    return await client.replay(
        chain_id,
        "answer",
        {"answer": StepOverride(model="small")},
        new_id=f"{chain_id}-r1",
        wait=60,
    )


def trip(chain_id: str) -> Chain:
    return Chain(
        id=chain_id,
        steps=[
            ToolStep(id="weather", tool="weather", args={"city": "Lisbon"}),
            LlmStep(
                id="answer",
                model="gpt-4o-mini",
                messages=[Message(role="user", content="Cycle? {{steps.weather.output}}")],
                params=Params(max_tokens=64, stream=True),
            ),
        ],
    )


def approval(chain_id: str) -> Chain:
    """docs/CHAINS.md's approve-1, under another id."""
    return Chain(
        id=chain_id,
        steps=[
            LlmStep(
                id="draft",
                model="gpt-4o-mini",
                messages=[Message(role="user", content="Draft a refund email for order 17")],
            ),
            WaitStep(id="approval", signal="approval", timeout_ms=60_000, after=["draft"]),
            ToolStep(
                id="send",
                tool="search",
                args={"query": "{{steps.draft.output}}"},
                when="steps.approval.output.approved == true",
            ),
        ],
    )


async def main(url: str) -> None:
    async with await Client.connect(url, "acme") as client:
        print(await quick_answer(client, "One word for a quick answer?"))

        first = trip(f"trip-{new_id()}")
        await follow(client, first)

        # Submit, act, then `run` the same chain again: it is not run twice, `run` finds its end.
        approved = approval(f"approve-{new_id()}")
        await client.submit(approved)
        await approve(client, approved.id)
        print(approved.id, type(await client.run(approved, timeout=60)).__name__)

        withdrawn = approval(f"approve-{new_id()}")
        await client.submit(withdrawn)
        await stop(client, withdrawn.id)
        ended = await client.run(withdrawn, timeout=60)
        assert isinstance(ended, ChainCancelled), ended
        print(withdrawn.id, type(ended).__name__, ended.reason)

        replayed = await retry_answer(client, first.id)
        print(replayed.chain_id, type(replayed).__name__)


if __name__ == "__main__":
    asyncio.run(main(os.environ.get("CHAINYARD_NATS", "nats://127.0.0.1:4222")))
