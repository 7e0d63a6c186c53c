"""Sandbox fixtures for the adapter tests; import them explicitly (conftest.py is not ours)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

from chainyard.contracts import Message, Params, ToolSpec
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.workers.providers import LlmRequest, ProviderError, make_provider

P = TypeVar("P")

KEY = "sk-test-secret-0123456789abcdef"

WEATHER = ToolSpec(
    name="get_weather",
    description="Weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)

SEARCH = ToolSpec(
    name="search",
    description="Web search",
    parameters={
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    },
)

# Two calls in one answer; `nope` is not offered, so the sandbox ignores it.
TWO_CALLS = (
    'call get_weather {"city": "Oslo"} and call search {"query": "bikes"} then call nope {"x": 1}'
)
TWO_CALLS_EXPECTED = [("get_weather", {"city": "Oslo"}), ("search", {"query": "bikes"})]


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(SandboxConfig(api_key=KEY)) as server:
        yield server


@contextlib.asynccontextmanager
async def adapter(kind: str, base_url: str, cls: type[P]) -> AsyncIterator[P]:
    """The `kind` provider on the sandbox at `base_url` (5 s timeout), closed after."""
    p = make_provider(kind, base_url, KEY, timeout_s=5.0)
    assert isinstance(p, cls)
    try:
        yield p
    finally:
        await p.aclose()


async def assert_timeout_then_dark(sandbox: SandboxServer, kind: str) -> None:
    """A call slower than the provider's timeout, then one to a sandbox that refuses the
    connection: both retryable, the refusal without a status."""
    await sandbox.configure(latency_ms=2_000)
    p = make_provider(kind, sandbox.url, KEY, timeout_s=0.2)
    with pytest.raises(ProviderError) as ei:
        await p.complete(req())
    assert ei.value.cls == "retryable" and "timeout" in ei.value.message
    await sandbox.configure(latency_ms=0, dark=True, dark_mode="refuse")
    with pytest.raises(ProviderError) as ei:
        await p.complete(req())
    assert ei.value.cls == "retryable" and ei.value.status is None
    await p.aclose()


def req(text: str = "hello there world", **params: object) -> LlmRequest:
    return LlmRequest(
        model="m-1",
        messages=[Message(role="system", content="be brief"), Message(role="user", content=text)],
        params=Params(**params),  # type: ignore[arg-type]
    )


def tool_req(text: str = 'call get_weather {"city": "Paris"}') -> LlmRequest:
    return LlmRequest(model="m-1", messages=[Message(role="user", content=text)], tools=[WEATHER])


def two_tools_req(text: str = TWO_CALLS) -> LlmRequest:
    return LlmRequest(
        model="m-1", messages=[Message(role="user", content=text)], tools=[WEATHER, SEARCH]
    )
