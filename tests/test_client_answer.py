"""`Client.answer`: a one-step chain's answer the moment the worker has stored it.

Two router replicas and two workers (test_chain_ids' `stack`) on a real nats-server;
two tenants reuse the same chain ids; the sandbox provider echoes the prompt, so an answer
shows whose step produced it. The router records each chain's end from the same stored event,
so the answer and the chain's end must agree."""

from __future__ import annotations

import asyncio

import pytest
from test_chain_ids import sandbox, stack  # noqa: F401  (fixtures, used by name)

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainFailed,
    ChainRejected,
    LlmStep,
    Message,
    StepCompleted,
)
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer


def ask(chain_id: str, text: str, model: str = "m") -> Chain:
    return Chain(
        id=chain_id,
        steps=[LlmStep(id="s", model=model, messages=[Message(role="user", content=text)])],
    )


@pytest.mark.usefixtures("stack")
async def test_answers_are_the_stored_answers_the_chains_end_with(nats_server: NatsServer) -> None:
    ta, tb = [await Client.connect(nats_server.url, t) for t in ("ta", "tb")]
    try:
        asked = [(tenant, c, i) for tenant, c in (("ta", ta), ("tb", tb)) for i in range(8)]
        got_all = await asyncio.gather(  # the same ids in both tenants, all at once
            *(c.answer(ask(f"same-{i}", f"{t} question {i}"), timeout=30) for t, c, i in asked)
        )
        answers = {}
        for (tenant, _, i), got in zip(asked, got_all, strict=True):
            assert isinstance(got, StepCompleted), got  # before the chain's end, not it
            assert (got.tenant, got.chain_id, got.step_id) == (tenant, f"same-{i}", "s")
            assert f"{tenant} question {i}" in got.output.text
            answers[tenant, i] = got
        for (tenant, i), got in answers.items():
            client = ta if tenant == "ta" else tb
            end = await client.run(ask(f"same-{i}", f"{tenant} question {i}"), timeout=30)
            assert isinstance(end, ChainCompleted), end
            assert (end.output, end.usage, end.cost_usd) == (got.output, got.usage, got.cost_usd)
    finally:
        await ta.close()
        await tb.close()


@pytest.mark.usefixtures("stack")
async def test_a_step_that_does_not_answer_gives_the_chains_end(
    nats_server: NatsServer,
    sandbox: SandboxServer,  # noqa: F811  (the fixture imported above)
) -> None:
    async with await Client.connect(nats_server.url, "ta") as client:
        unknown = await client.answer(ask("no-model", "hi", model="nobody-serves-this"))
        assert isinstance(unknown, ChainRejected), unknown
        assert "nobody-serves-this" in "; ".join(e.message for e in unknown.errors)
        await sandbox.configure(SandboxConfig(error_rate=1.0, error_status=400))
        failed = await client.answer(ask("refused", "hi"), timeout=30)
        assert isinstance(failed, ChainFailed), failed
        assert failed.error is not None and failed.error.status == 400


async def test_answer_takes_one_step_only(nats_server: NatsServer) -> None:
    async with await Client.connect(nats_server.url, "ta") as client:
        two = Chain(
            id="two",
            steps=[
                LlmStep(id="a", model="m", messages=[Message(role="user", content="a")]),
                LlmStep(id="b", model="m", messages=[Message(role="user", content="b")]),
            ],
        )
        with pytest.raises(ValueError, match="one step"):
            await client.answer(two)
