"""The JavaScript example client (clients/js/submit.mjs) against a real dev stack.

It proves that a client in another language needs only the JSON Schema files and the subjects.
Node.js and npm are needed; without them the tests are skipped. Without clients/js/node_modules
the first test installs the locked dependencies with `npm ci`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import chain_log

from chainyard.client import Client
from chainyard.contracts import Chain, ChainCompleted, LlmStep, Message, ToolStep, encode
from chainyard.demo import demo_config, tools
from chainyard.devstack import DevStack
from chainyard.runtime.nats import Bus
from chainyard.sandbox import SandboxConfig

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "clients" / "js"
SUBMIT = JS / "submit.mjs"
TENANT = "acme"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

NODE = shutil.which("node")
NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="the JavaScript client needs Node.js and npm on PATH"
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """clients/js/node_modules, installed from package-lock.json with `npm ci` when missing."""
    modules = JS / "node_modules"
    if not all((modules / m).is_dir() for m in ("nats", "ajv", "openai")):
        assert NPM is not None
        done = subprocess.run(
            [NPM, "ci", "--prefix", str(JS), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.fail(f"npm ci --prefix clients/js failed:\n{done.stdout}\n{done.stderr}")
    return modules


@pytest.fixture
async def dev(node_modules: Path) -> AsyncIterator[DevStack]:
    config = DevStack(
        demo_config(), local_model=False, tools=tools, sandbox=SandboxConfig(latency_ms=20.0)
    )
    async with config as stack:
        yield stack


async def run_js(
    *args: str, stdin: bytes | None = None, wait_s: float = 60.0
) -> tuple[int, str, str]:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(SUBMIT),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CHAINYARD_NATS": "", "CHAINYARD_TENANT": ""},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), wait_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def weather_chain(chain_id: str, model: str = "gpt-4o-mini") -> Chain:
    return Chain(
        id=chain_id,
        steps=[
            ToolStep(id="weather", tool="weather", args={"city": "Lisbon"}),
            LlmStep(
                id="answer",
                model=model,
                messages=[
                    Message(
                        role="user", content="Cycle tomorrow? Forecast: {{steps.weather.output}}"
                    )
                ],
            ),
        ],
        deadline_ms=30_000,
    )


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def test_js_client_submits_and_prints_chain_completed(dev: DevStack, tmp_path: Path) -> None:
    assert dev.bus is not None
    bus: Bus = dev.bus
    seen: list[tuple[str, dict[str, str]]] = []

    async def on_submit(msg) -> None:
        seen.append((msg.subject, dict(msg.headers or {})))

    # A plain subscriber sees what the client published, headers included.
    sub = await bus.nc.subscribe(bus.topology.subjects.submit(TENANT), cb=on_submit)
    chain = weather_chain("js-weather-1")
    path = write(tmp_path, "chain.json", encode(chain))

    code, out, err = await run_js(
        "--nats", dev.nats_url, "--tenant", TENANT, "--traceparent", TRACEPARENT, str(path)
    )
    await sub.unsubscribe()

    assert code == 0, err
    ev = json.loads(out)
    assert ev["type"] == "chain.completed"
    assert ev["chain_id"] == chain.id and ev["tenant"] == TENANT
    assert ev["output"]["text"]
    by_step = {s["step_id"]: s for s in ev["steps"]}
    assert by_step["weather"]["status"] == "completed"
    assert by_step["weather"]["pool"] == "tool.weather"
    assert by_step["answer"]["status"] == "completed"
    assert by_step["answer"]["model"] == "gpt-4o-mini"
    assert by_step["answer"]["pool"] == "cloud-sim"
    assert f"submitted {chain.id}" in err
    # Submitted once, with no stream-wide message id (chain ids are per tenant) and the trace
    # context propagated.
    assert [s for s, _ in seen] == [f"cy.submit.{TENANT}"]
    headers = seen[0][1]
    assert "Nats-Msg-Id" not in headers
    assert headers["traceparent"] == TRACEPARENT


async def test_js_client_resubmission_runs_once_and_still_gets_the_result(
    dev: DevStack, tmp_path: Path
) -> None:
    """The same chain again after it ended: it does not run twice, and the client answers at
    once with the first run's end, read from the event log. A different chain under the same id
    is rejected, and the client prints that rejection, not the other chain's end."""
    assert dev.bus is not None
    chain = weather_chain("js-weather-dup")
    path = write(tmp_path, "chain.json", encode(chain))
    first = await run_js("--nats", dev.nats_url, "--tenant", TENANT, str(path))
    assert first[0] == 0, first[2]
    again = await run_js("--nats", dev.nats_url, "--tenant", TENANT, "--timeout", "20", str(path))
    assert again[0] == 0, again[2]
    assert json.loads(again[1]) == json.loads(first[1])
    logged = await chain_log(dev.bus.js, TENANT, chain.id)
    assert [type(e).__name__ for e in logged].count("ChainCompleted") == 1
    porto = Chain(
        id=chain.id, steps=[ToolStep(id="weather", tool="weather", args={"city": "Porto"})]
    )
    other = write(tmp_path, "other.json", encode(porto))
    code, out, err = await run_js(
        "--nats", dev.nats_url, "--tenant", TENANT, "--timeout", "20", str(other)
    )
    assert code == 1, err
    ev = json.loads(out)
    assert ev["type"] == "chain.rejected" and ev["id_in_use"] is True
    assert "rejected: $.id: chain id 'js-weather-dup' is already used by another chain" in err


async def test_js_client_prints_rejection_with_path_and_exits_nonzero(
    dev: DevStack, tmp_path: Path
) -> None:
    chain = weather_chain("js-unknown-model", model="gpt-9")
    path = write(tmp_path, "chain.json", encode(chain))

    code, out, err = await run_js("--nats", dev.nats_url, "--tenant", TENANT, str(path))

    assert code == 1
    ev = json.loads(out)
    assert ev["type"] == "chain.rejected"
    assert ev["chain_id"] == chain.id
    paths = [e["path"] for e in ev["errors"]]
    assert "$.steps[1].model" in paths
    assert "rejected: $.steps[1].model: " in err
    assert "gpt-9" in err


async def test_js_client_refuses_schema_invalid_chain_before_sending(
    node_modules: Path, tmp_path: Path
) -> None:
    """Nothing listens on the URL: the client must stop at validation, before connecting."""
    bad = {
        "id": "js-bad",
        "budget_usb": 0.05,  # a typo the intake would also reject
        "steps": [
            {"kind": "llm", "id": "plan", "model": "gpt-4o-mini", "messages": []},
            {"kind": "tool", "id": "weather", "args": {"city": "Lisbon"}},
            {"kind": "sleep", "id": "nap"},
        ],
    }
    path = write(tmp_path, "bad.json", json.dumps(bad).encode())

    code, out, err = await run_js("--nats", "nats://127.0.0.1:1", "--tenant", TENANT, str(path))

    assert code == 2, err
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith("invalid: $")]
    assert lines == [
        "invalid: $.budget_usb: unknown field",
        "invalid: $.steps[0].messages: must NOT have fewer than 1 items",
        "invalid: $.steps[1].tool: required field is missing",
        'invalid: $.steps[2].kind: must be one of "llm", "tool", "wait"',
    ]
    assert "the chain was not sent" in err
    assert "error:" not in err  # no connection attempt was made


async def test_js_client_refuses_non_json_from_stdin(node_modules: Path) -> None:
    code, out, err = await run_js("--nats", "nats://127.0.0.1:1", "-", stdin=b"{not json")
    assert code == 2 and out == ""
    assert "invalid: $: not JSON" in err


async def test_python_client_sees_the_same_result_as_the_js_client(
    dev: DevStack, tmp_path: Path
) -> None:
    """Both clients get one and the same terminal event for one chain."""
    assert dev.bus is not None
    chain = weather_chain("js-and-py")
    py = Client(dev.bus.nc, TENANT, dev.bus.topology)
    seen: list[object] = []

    async def watch() -> None:
        async for ev in py.watch(chain.id, history=False):
            seen.append(ev)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.1)  # the watcher's subscription is in place
    path = write(tmp_path, "chain.json", encode(chain))
    code, out, err = await run_js("--nats", dev.nats_url, "--tenant", TENANT, str(path))
    await asyncio.wait_for(watcher, 10)

    assert code == 0, err
    ended = seen[-1]
    assert isinstance(ended, ChainCompleted)
    assert json.loads(out)["output"]["text"] == ended.output.text
