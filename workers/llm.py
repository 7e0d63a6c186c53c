"""The executor of LLM steps: one provider adapter, priced per call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from chainyard.contracts import Assignment, LlmStep, Target, Usage
from chainyard.runtime.genai import traced_chat

from .providers._base import LlmRequest, OnDelta, Provider, ProviderError
from .runtime import Execute, Result

# price(target, usage) -> USD
Price = Callable[[Target, Usage], float]


def llm_executor(provider: Provider, price: Price) -> Execute:
    async def execute(a: Assignment, on_delta: OnDelta | None) -> Result:
        step = a.step
        if not isinstance(step, LlmStep):
            raise ProviderError("fatal", f"an LLM pool got a {type(step).__name__}")
        request = LlmRequest(
            model=a.target.model, messages=step.messages, tools=step.tools, params=step.params
        )
        if a.deadline_at_ms is not None:
            # asyncio.timeout, not wait_for: no extra task per call
            left_s = a.deadline_at_ms / 1000 - time.time()
            deadline = asyncio.timeout(max(left_s, 0.001))
            try:
                async with deadline:
                    c = await provider.complete(request, on_delta)
            except TimeoutError:
                if not deadline.expired():
                    raise
                raise ProviderError(
                    "timeout", "the step's deadline passed during the call"
                ) from None
        else:
            c = await provider.complete(request, on_delta)
        return Result(
            output=c.output,
            usage=c.usage,
            cost_usd=price(a.target, c.usage),
            model=c.model,
            ttft_ms=c.ttft_ms,
            limits=c.limits,
        )

    return traced_chat(execute)  # a `chat {model}` span per call when tracing is on
