"""A worker step against the real local model (llama.cpp, SmolLM2-135M): usage and cost."""

from __future__ import annotations

import pytest
from helpers import Events, running
from worker_support import POOL, TENANT, assignment, publish, worker

from chainyard.contracts import Config, Deployment, PoolConfig, Price, StepCompleted, StepFailed
from chainyard.runtime.nats import Bus
from chainyard.sandbox import local_model
from chainyard.sandbox.local_model import LocalModel

pytestmark = [
    pytest.mark.localmodel,
    pytest.mark.skipif(
        not local_model.available(), reason=f"local model: {local_model.unavailable_reason()}"
    ),
]

PRICE = Price(input_per_mtok=2.0, output_per_mtok=5.0)  # a self-hosted model's own price


async def test_worker_step_on_local_model_has_usage_and_cost(bus: Bus) -> None:
    async with LocalModel() as lm:
        cfg = Config(
            deployments=[Deployment(name="d-local", pool=POOL, model=lm.model, price=PRICE)],
            pools=[PoolConfig(name=POOL, provider="openai", base_url=lm.base_url, slots=2)],
        )
        a = assignment("local1", text="Name three colours.", deployment="d-local", model=lm.model)
        async with Events(bus.nc, f"cy.events.{TENANT}.>") as ev, running(worker(bus, cfg)):
            await publish(bus, a)
            done = await ev.wait(lambda e: isinstance(e, StepCompleted | StepFailed), 120)
    assert isinstance(done, StepCompleted), done
    assert done.output.text.strip()
    u = done.usage
    assert u.input_tokens > 0 and u.output_tokens > 0
    expected = u.input_tokens * PRICE.input_per_mtok + u.output_tokens * PRICE.output_per_mtok
    assert done.cost_usd == pytest.approx(expected / 1e6, rel=1e-9)
    assert done.cost_usd > 0
    assert done.latency_ms > 0 and done.target.deployment == "d-local"
