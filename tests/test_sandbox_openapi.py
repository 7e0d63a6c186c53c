"""What the OpenAI adapter sends and what the sandbox answers, checked against OpenAI's OpenAPI.

The document is read from ../shared/specs (never copied into the project); without it the tests
skip. OpenAPI 3.1 schemas are JSON Schema 2020-12, except for the 3.0 leftover `nullable: true`
that this document still uses: it is rewritten to `anyOf [schema, null]` before validation.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sandbox_fixtures import KEY, req, sandbox, tool_req, two_tools_req

from chainyard.contracts import Message, ToolCall
from chainyard.sandbox import SandboxServer
from chainyard.sandbox.load import TEXT as LOAD_TEXT
from chainyard.sandbox.load import LoadSandbox
from chainyard.workers.providers import LlmRequest, make_provider

__all__ = ["sandbox"]

SPEC = Path(__file__).resolve().parents[2] / "shared/specs/openai-openapi.yaml"
URI = "urn:openai-openapi"

pytestmark = pytest.mark.skipif(
    not SPEC.exists(), reason=f"OpenAI OpenAPI document not found at {SPEC} (../shared/specs)"
)


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _registry() -> Registry:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the file is 3 MB
    doc = _nullable(yaml.load(SPEC.read_text(), Loader=loader))
    return Registry().with_resource(
        URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )


def validate(instance: Any, schema_name: str) -> None:
    schema = {"$ref": f"{URI}#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=_registry()).validate(instance)


def test_schema_rejects_garbage() -> None:
    # the checks below mean something only if a wrong document fails
    with pytest.raises(jsonschema.ValidationError):
        validate({"model": "m", "messages": []}, "CreateChatCompletionRequest")
    with pytest.raises(jsonschema.ValidationError):
        validate({"id": "x", "object": "chat.completion"}, "CreateChatCompletionResponse")


async def test_adapter_requests_match_schema(sandbox: SandboxServer) -> None:
    ai = make_provider("openai", f"{sandbox.url}/v1", KEY)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    round_trip = LlmRequest(
        model="m-1",
        tools=tool_req().tools,
        messages=[
            Message(role="user", content="call get_weather"),
            Message(role="assistant", tool_calls=[ToolCall(id="c1", name="get_weather")]),
            Message(role="tool", tool_call_id="c1", content="sunny"),
        ],
    )
    await ai.complete(req(max_tokens=9, temperature=0.1, stop=["x"]))
    await ai.complete(req(), lambda _: None)
    await ai.complete(tool_req())
    await ai.complete(two_tools_req())
    await ai.complete(round_trip)
    await ai.complete(req(response_format="json"))
    await ai.complete(req(response_format="json", json_schema=schema))
    await ai.aclose()
    bodies = [c.body for c in sandbox.captured]
    assert len(bodies) == 7
    for body in bodies:
        validate(body, "CreateChatCompletionRequest")


async def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
        )


def _chunks(text: str) -> list[Any]:
    data = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [msgspec.json.decode(d) for d in data[:-1]]


@pytest.mark.parametrize("n_calls", [0, 1, 2])
async def test_sandbox_responses_match_schema(sandbox: SandboxServer, n_calls: int) -> None:
    r = [req, tool_req, two_tools_req][n_calls]()
    ai = make_provider("openai", f"{sandbox.url}/v1", KEY)
    body = ai.body(r, stream=False)  # type: ignore[attr-defined]
    await ai.aclose()
    resp = await _post(sandbox.url, body)
    assert resp.status_code == 200
    validate(resp.json(), "CreateChatCompletionResponse")
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == ("tool_calls" if n_calls else "stop")
    calls = choice["message"].get("tool_calls") or []
    assert len(calls) == n_calls and len({c["id"] for c in calls}) == n_calls

    resp = await _post(
        sandbox.url, {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    chunks = _chunks(resp.text)
    assert len(chunks) >= 3
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    # each call: a chunk with its id and name, then two argument pieces, all under its index
    pieces = [tc for c in chunks for ch in c["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert [tc["index"] for tc in pieces] == [i for i in range(n_calls) for _ in range(3)]
    assert len({tc["id"] for tc in pieces if "id" in tc}) == n_calls


async def test_sandbox_error_body_shape(sandbox: SandboxServer) -> None:
    await sandbox.configure(context_window=1)
    resp = await _post(
        sandbox.url, {"model": "m", "messages": [{"role": "user", "content": "a b"}]}
    )
    assert resp.status_code == 400
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["code"] == "context_length_exceeded"


async def test_load_sandbox_matches_schema_and_the_adapter_reads_it() -> None:
    async with LoadSandbox() as s:
        ai = make_provider("openai", s.url, KEY)
        body = ai.body(req(), stream=False)  # type: ignore[attr-defined]
        done = await ai.complete(req())
        await ai.aclose()
        resp = await _post(s.url.removesuffix("/v1"), body)
    assert resp.status_code == 200
    validate(resp.json(), "CreateChatCompletionResponse")
    assert resp.json()["model"] == body["model"]
    assert done.output.text == LOAD_TEXT and done.usage.input_tokens == 12
    assert done.limits is not None and done.limits.remaining_requests is not None
