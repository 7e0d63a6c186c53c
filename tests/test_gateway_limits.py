"""The gateway's side of the keys/limits seam (chainyard/gateway/core.py `Keys`, `Limits`):
a refusal is a 429 with `retry-after` in each front's shape and runs nothing; a completed call
is settled with its real tokens and cost. A stand-in Limits drives it, over a dev stack."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest
from helpers import wait_until

from chainyard.demo import demo_config, tools
from chainyard.devstack import DevStack
from chainyard.gateway.app import HttpServer
from chainyard.gateway.core import Gateway, Grant, StaticGrant, StaticKeys
from chainyard.sandbox import SandboxConfig


class CountingLimits:
    """Refuses while `refuse_for` is set; records what was settled."""

    def __init__(self) -> None:
        self.refuse_for: float | None = None
        self.settled: list[tuple[str, int, float]] = []
        self.estimates: list[int] = []
        self.broken = False  # settle raises, as with NATS unreachable

    async def admit(self, grant: Grant, *, tokens_estimate: int) -> float | None:
        self.estimates.append(tokens_estimate)
        return self.refuse_for

    def settles(self, grant: Grant) -> bool:
        return True

    async def settle(
        self, grant: Grant, *, tokens: int, cost_usd: float, chain_id: str | None = None
    ) -> None:
        if self.broken:
            raise TimeoutError("NATS did not answer")
        self.settled.append((grant.tenant, tokens, cost_usd))


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, CountingLimits, DevStack]]:
    stack = DevStack(
        demo_config(), local_model=False, tools=tools, sandbox=SandboxConfig(latency_ms=0.0)
    )
    async with stack as dev:
        assert dev.bus is not None
        limits = CountingLimits()
        keys = StaticKeys({"sk-t": StaticGrant(key_id="k1", tenant="tenant-a")})
        async with HttpServer(Gateway(dev.bus.nc, dev.config, keys=keys, limits=limits)) as s:
            yield s.url, limits, dev


async def test_refused_request_is_429_with_retry_after_and_runs_nothing(
    gateway: tuple[str, CountingLimits, DevStack],
) -> None:
    url, limits, dev = gateway
    assert dev.sandbox is not None
    limits.refuse_for = 2.2
    before = dev.sandbox.counts["openai.chat"]
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-t", max_retries=0) as oa:
        with pytest.raises(openai.RateLimitError) as over:
            await oa.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
    assert over.value.response.headers["retry-after"] == "3"
    assert over.value.code == "rate_limit_exceeded"
    async with anthropic.AsyncAnthropic(base_url=url, api_key="sk-t", max_retries=0) as an:
        with pytest.raises(anthropic.RateLimitError) as over_a:
            await an.messages.create(
                model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
    assert over_a.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert dev.sandbox.counts["openai.chat"] == before
    assert limits.settled == []


async def test_completed_call_is_settled_with_its_tokens_and_cost(
    gateway: tuple[str, CountingLimits, DevStack],
) -> None:
    url, limits, _ = gateway
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-t", max_retries=0) as oa:
        done = await oa.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "count these words"}]
        )
    assert done.usage is not None
    assert limits.estimates and limits.estimates[0] > 0
    await wait_until(lambda: limits.settled, 5, "the call to be settled, after its answer")
    [(tenant, tokens, cost)] = limits.settled
    assert tenant == "tenant-a" and tokens == done.usage.total_tokens and cost > 0


async def test_a_retry_with_the_same_idempotency_key_is_settled_once(
    gateway: tuple[str, CountingLimits, DevStack],
) -> None:
    """The retry gets the first answer and runs nothing; its usage was counted the first time."""
    url, limits, dev = gateway
    assert dev.sandbox is not None
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "once"}]}
    headers = {"Idempotency-Key": "pay-once-1"}
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-t", max_retries=0) as oa:
        first = await oa.chat.completions.create(**ask, extra_headers=headers)
        await wait_until(lambda: limits.settled, 5, "the first call to be settled")
        calls = dev.sandbox.counts["openai.chat"]
        again = await oa.chat.completions.create(**ask, extra_headers=headers)
    assert again.id == first.id and dev.sandbox.counts["openai.chat"] == calls
    assert len(limits.settled) == 1, limits.settled


async def test_an_answer_is_not_lost_when_counting_it_fails(
    gateway: tuple[str, CountingLimits, DevStack],
) -> None:
    """Settling runs after the answer: a failure to count is logged, the caller has its answer."""
    url, limits, _ = gateway
    limits.broken = True
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-t", max_retries=0) as oa:
        done = await oa.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "still answered"}]
        )
    assert done.choices[0].message.content
    assert limits.settled == []
