"""Breakers shared through KV: results are counted once per router, per tenant's identity."""

from __future__ import annotations

from helpers import wait_until

from chainyard.contracts import Config, Deployment, ErrorInfo, StepFailed, Target
from chainyard.router.breakers import Breakers
from chainyard.runtime.nats import Bus


def failure(tenant: str) -> StepFailed:
    return StepFailed(
        chain_id="x", step_id="s", attempt=1, tenant=tenant,
        error=ErrorInfo(cls="retryable", message="HTTP 500", status=500),
        target=Target(deployment="d", pool="p", provider="openai", model="m"), worker="w",
    )  # fmt: skip


async def test_two_tenants_same_ids_are_two_results(bus: Bus) -> None:
    """The same (chain, step, attempt) under two tenants is two calls that failed: both count,
    while a repeat of one tenant's result (a redelivered event) counts once."""
    cfg = Config(deployments=[Deployment(name="d", pool="p", model="m")], breaker_failures=3)
    breakers = Breakers(bus.breakers, cfg)
    await breakers.start()
    try:
        for tenant in ("ta", "ta", "tb"):
            breakers.observe(failure(tenant))
        await wait_until(lambda: breakers.status("d").failures == 2, 5, "two failures recorded")
        breakers.observe(failure("tc"))
        await wait_until(lambda: breakers.status("d").status == "open", 5, "the breaker open")
    finally:
        await breakers.stop()
