"""The `openai` npm package, unchanged but for baseURL and key, against `chainyard gateway`
(plain, streaming with usage, a tool call, an error; the Responses API plain and streamed) over
tests/gateway_stack.py's deployment."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from gateway_stack import KEYS, Stack, live_stack
from test_js_client import JS, NODE, node_modules

__all__ = ["node_modules"]

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(NODE is None, reason="needs Node.js and npm on PATH"),
]

APP = """
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.argv[2], apiKey: process.argv[3], maxRetries: 0 });
const out = {};
const plain = await client.chat.completions.create({
  model: "gpt-4o-mini", messages: [{ role: "user", content: "hello from node" }],
});
out.plain = plain.choices[0].message.content;
const stream = await client.chat.completions.create({
  model: "small", messages: [{ role: "user", content: "stream from node" }],
  stream: true, stream_options: { include_usage: true },
});
out.streamed = "";
for await (const chunk of stream) {
  out.streamed += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) out.usage = chunk.usage.completion_tokens;
}
const tools = [{ type: "function", function: { name: "get_weather", parameters: {
  type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
const called = await client.chat.completions.create({
  model: "gpt-4o-mini", tools,
  messages: [{ role: "user", content: 'call get_weather {"city": "Rome"}' }],
});
out.call = called.choices[0].message.tool_calls[0].function;
const answered = await client.responses.create({
  model: "gpt-4o-mini", instructions: "Be brief.", input: "responses from node",
});
out.responses = { text: answered.output_text, status: answered.status };
const events = client.responses.stream({ model: "small", input: "stream responses from node" });
out.responsesStreamed = "";
for await (const ev of events) {
  if (ev.type === "response.output_text.delta") out.responsesStreamed += ev.delta;
}
out.responsesFinal = (await events.finalResponse()).usage.output_tokens;
try {
  const messages = [{ role: "user", content: "x" }];
  await client.chat.completions.create({ model: "gpt-9", messages });
} catch (e) {
  out.error = { status: e.status, code: e.code, param: e.param };
}
console.log(JSON.stringify(out));
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with live_stack(tmp_path_factory.mktemp("gw"), gateways=1) as s:
        yield s


async def test_openai_npm_package_against_the_gateway(
    live: Stack, node_modules: Path, tmp_path: Path
) -> None:
    # beside node_modules, so `import "openai"` resolves; one name per test process
    script = JS / f"gateway-sdk-check-{os.getpid()}.mjs"
    script.write_text(APP)
    try:
        assert NODE is not None
        proc = await asyncio.create_subprocess_exec(
            NODE, str(script), live.v1(), KEYS["acme"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        script.unlink(missing_ok=True)
    assert proc.returncode == 0, err.decode()
    got = json.loads(out)
    assert got["plain"] == "echo: hello from node"
    assert got["streamed"] == "echo: stream from node" and got["usage"] == 4
    assert got["call"]["name"] == "get_weather"
    assert json.loads(got["call"]["arguments"]) == {"city": "Rome"}
    assert got["error"] == {"status": 404, "code": "model_not_found", "param": "model"}
    # the Responses API, from the same client
    assert got["responses"] == {"text": "echo: responses from node", "status": "completed"}
    assert got["responsesStreamed"] == "echo: stream responses from node"
    assert got["responsesFinal"] > 0
