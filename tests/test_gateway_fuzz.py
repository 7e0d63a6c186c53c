"""Whatever JSON a client sends to any front, the gateway answers in that front's shape and
never with a 500: generated bodies (known and unknown fields, values of every JSON type) over a
dev stack with the gateway in this process."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainyard.demo import demo_config, tools
from chainyard.devstack import DevStack
from chainyard.gateway import anthropic, openai, responses
from chainyard.sandbox import SandboxConfig

SCALAR = (
    st.none() | st.booleans() | st.integers(-5, 70_000)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)  # fmt: skip
JSON = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"])},
    optional={"content": JSON | st.text(max_size=20), "tool_calls": JSON, "tool_call_id": JSON},
)
ITEM = MESSAGE | st.fixed_dictionaries(  # the Responses API's input items
    {"type": st.sampled_from(["message", "function_call", "function_call_output", "x"])},
    optional={"call_id": JSON, "name": JSON, "arguments": JSON, "output": JSON, "role": JSON},
)


def bodies(known: frozenset[str], turns: str = "messages") -> st.SearchStrategy[dict[str, Any]]:
    """Mostly plausible requests, some broken anywhere: so that both answers and every kind of
    refusal are exercised. `turns` names the conversation's field (`input` for responses)."""
    plain = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)})
    base = st.fixed_dictionaries(
        {"model": st.sampled_from(["gpt-4o-mini", "small", "small", "nope"]) | JSON},
        optional={
            turns: st.lists(plain, min_size=1, max_size=2)
            | st.lists(ITEM if turns == "input" else MESSAGE, max_size=3)
            | JSON,
            "max_tokens": st.integers(1, 32) | JSON,
        },
    )
    extra = st.just({}) | st.dictionaries(
        st.sampled_from(sorted(known)) | st.text(max_size=6), JSON, max_size=2
    )
    return st.builds(lambda b, e: {**e, **b}, base, extra)


async def check(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> int:
    r = await http.post(path, json=body, headers={"x-chainyard-deadline-ms": "5000"})
    assert r.status_code != 500, (body, r.text)
    if r.status_code >= 400:
        err = r.json()
        if path.endswith("/messages"):
            assert err["type"] == "error" and set(err["error"]) == {"type", "message"}
        else:
            assert set(err["error"]) == {"message", "type", "param", "code"}
    return r.status_code


async def test_any_body_gets_an_answer_in_shape() -> None:
    stack = DevStack(
        demo_config(), local_model=False, tools=tools, sandbox=SandboxConfig(), gateway_port=0
    )
    async with stack as dev, httpx.AsyncClient(base_url=dev.gateway_url, timeout=30) as http:
        seen: list[int] = []
        pending: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []

        # hypothesis drives sync functions: it draws the bodies, the loop then sends them
        @settings(
            max_examples=150,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        @given(
            body=bodies(openai.KNOWN),
            messages=bodies(anthropic.KNOWN),
            response=bodies(responses.KNOWN, "input"),
        )
        def run(body: dict[str, Any], messages: dict[str, Any], response: dict[str, Any]) -> None:
            seen.append(1)
            pending.append((body, messages, response))

        run()
        statuses: Counter[int] = Counter()
        answered: Counter[str] = Counter()
        for body, messages, response in pending:
            for path, sent in (
                ("/v1/chat/completions", body),
                ("/v1/messages", messages),
                ("/v1/responses", response),
            ):
                status = await check(http, path, sent)
                statuses[status] += 1
                answered[path] += status == 200
        assert len(seen) == 150
        assert statuses[200] > 0 and statuses[400] > 0, statuses
        assert all(answered.values()) and len(answered) == 3, answered  # each front answered
        r = await http.post("/v1/chat/completions", json={"model": "small", "messages": [
            {"role": "user", "content": "still fine"}]})  # fmt: skip
        assert r.json()["choices"][0]["message"]["content"] == "echo: still fine"
