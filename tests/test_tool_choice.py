"""`Params.tool_choice` in each provider's wire format (auto, none, required, one tool)."""

from __future__ import annotations

from typing import Any

import pytest

from chainyard.contracts import Message, Params, ToolSpec
from chainyard.workers.providers import LlmRequest, make_provider

TOOL = ToolSpec(name="get_weather", parameters={"type": "object", "properties": {}})


def request(choice: str | None) -> LlmRequest:
    return LlmRequest(
        model="m",
        messages=[Message(role="user", content="hi")],
        tools=[TOOL],
        params=Params(tool_choice=choice),
    )


def body(kind: str, choice: str | None) -> dict[str, Any]:
    provider: Any = make_provider(kind, "http://127.0.0.1:9/v1", "k")
    req = request(choice)
    return provider.body(req) if kind == "gemini" else provider.body(req, False)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ("get_weather", {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
def test_openai(choice: str | None, expected: object) -> None:
    assert body("openai", choice)["tool_choice"] == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", None),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ("get_weather", {"type": "tool", "name": "get_weather"}),
    ],
)
def test_anthropic(choice: str | None, expected: object) -> None:
    assert body("anthropic", choice).get("tool_choice") == expected


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("none", {"functionCallingConfig": {"mode": "NONE"}}),
        ("required", {"functionCallingConfig": {"mode": "ANY"}}),
        (
            "get_weather",
            {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        ),
    ],
)
def test_gemini(choice: str | None, expected: object) -> None:
    assert body("gemini", choice).get("toolConfig") == expected
