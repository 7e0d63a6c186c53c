"""retry_api: JetStream API calls asked again while the cluster elects a leader."""

from __future__ import annotations

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError, ServiceUnavailableError

from chainyard.runtime.nats import retry_api


async def test_unavailable_then_answered() -> None:
    calls = 0

    async def api() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise NatsTimeoutError
        if calls == 2:
            raise ServiceUnavailableError
        return "info"

    assert await retry_api(api) == "info" and calls == 3


async def test_gives_up_after_its_time_and_passes_other_errors_at_once() -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise NatsTimeoutError

    with pytest.raises(NatsTimeoutError):
        await retry_api(down, within_s=0.3)
    assert calls >= 2  # asked again, then gave up when its time was over

    async def missing() -> None:
        raise NotFoundError

    with pytest.raises(NotFoundError):  # an answer, not an outage: no retry
        await retry_api(missing, within_s=5)
