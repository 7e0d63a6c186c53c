"""The worker's throttle gate: open without a wait, closed for the 429's retry-after."""

from __future__ import annotations

import asyncio

from chainyard.workers.health import Health
from chainyard.workers.providers._base import ProviderError


async def test_the_gate_is_open_until_a_429_then_waits_out_its_retry_after() -> None:
    health = Health()
    assert health.gate() is None  # open: consume() sends its pull request with no wait
    health.record_failure("d", ProviderError("retryable", "busy", status=500), 1.0)
    assert health.gate() is None  # only a 429 closes it
    health.record_failure(
        "d", ProviderError("retryable", "slow down", status=429, retry_after_s=0.2), 1.0
    )
    wait = health.gate()
    assert wait is not None
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(wait, 5)
    assert loop.time() - t0 >= 0.15  # held for the retry-after (timer granularity aside)
    assert health.gate() is None
