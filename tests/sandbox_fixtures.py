"""Sandbox fixtures for the adapter tests; import them explicitly (conftest.py is not ours)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chainyard.contracts import Message, Params, ToolSpec
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.workers.providers import LlmRequest

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
