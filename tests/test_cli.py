"""The command line as a user runs it: separate processes, a dev stack, submit, schema, SIGTERM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dev_process import CLI, Dev, dev, start_dev, stop_dev
from helpers import alive, children_of, python_env

from chainyard.contracts import schema_export

__all__ = ["dev"]


def submit(dev: Dev, chain: dict, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(chain))
    return subprocess.run(
        [*CLI, "submit", str(path), "--wait", "--nats", dev.url, "--timeout", "60", *extra],
        capture_output=True,
        text=True,
        timeout=90,
        env=python_env(),
    )


GOOD = {
    "id": "cli-good",
    "steps": [
        {"kind": "tool", "id": "forecast", "tool": "weather", "args": {"city": "Oslo"}},
        {
            "kind": "llm",
            "id": "answer",
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "user", "content": "Weather: {{steps.forecast.output.conditions}}"}
            ],
        },
    ],
}


def test_schema_writes_the_files(tmp_path: Path) -> None:
    out = tmp_path / "schema"
    r = subprocess.run(
        [*CLI, "schema", "--out", str(out)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    expected = schema_export.render()
    # --out gets everything: the schema files and the AsyncAPI document that refers to them.
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "asyncapi.yaml"])
    assert "./chain.json" in (out / "asyncapi.yaml").read_text()
    for name, text in expected.items():
        assert (out / name).read_text() == text
    printed = [Path(line) for line in r.stdout.split()]
    assert sorted(p.name for p in printed if p.suffix == ".json") == sorted(expected)
    assert all(p.is_file() for p in printed)


def test_submit_wait_good_chain_exits_zero_with_completed_event(dev: Dev, tmp_path: Path) -> None:
    r = submit(dev, GOOD, tmp_path / "good.json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert (
        ev["type"] == "chain.completed"
        and ev["chain_id"] == "cli-good"
        and ev["tenant"] == "default"
    )
    assert ev["output"]["text"] == "echo: Weather: snow"
    pools = {s["step_id"]: s["pool"] for s in ev["steps"]}
    assert pools == {"forecast": "tool.weather", "answer": "cloud-sim"}
    assert ev["cost_usd"] > 0  # gpt-4o-mini priced from the genai-prices table


def test_submit_wait_rejected_chain_exits_nonzero(dev: Dev, tmp_path: Path) -> None:
    bad = json.loads(json.dumps(GOOD))
    bad["id"] = "cli-bad"
    bad["steps"][1]["model"] = "no-such-model"
    r = submit(dev, bad, tmp_path / "bad.json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["type"] == "chain.rejected" and ev["chain_id"] == "cli-bad"
    assert "rejected: $.steps[1].model: no deployment serves model 'no-such-model'" in r.stderr


def test_submit_wait_malformed_file_exits_nonzero(dev: Dev, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"id": "cli-broken", "steps": [')
    r = subprocess.run(
        [*CLI, "submit", str(path), "--wait", "--nats", dev.url, "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=90,
        env=python_env(),
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert json.loads(r.stdout.strip().splitlines()[-1])["type"] == "chain.rejected"
    assert "rejected: $: " in r.stderr


def test_dev_sigterm_exits_cleanly_and_leaves_no_nats_server(tmp_path: Path) -> None:
    d = start_dev(tmp_path / "dev.log")
    try:
        servers = [pid for pid, name in children_of(d.proc.pid) if name == "nats-server"]
        assert len(servers) == 1, children_of(d.proc.pid)
    finally:
        rc = stop_dev(d)
    assert rc == 0, d.log.read_text()
    assert not alive(servers[0]), f"nats-server {servers[0]} outlived the dev stack"
    assert children_of(d.proc.pid) == []


def test_submit_chain_without_id_gets_one(dev: Dev, tmp_path: Path) -> None:
    chain = {k: v for k, v in GOOD.items() if k != "id"}
    r = submit(dev, chain, tmp_path / "no-id.json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["type"] == "chain.completed" and len(ev["chain_id"]) == 26
    path = tmp_path / "no-id.json"
    printed = subprocess.run(
        [*CLI, "submit", str(path), "--nats", dev.url],
        capture_output=True, text=True, timeout=60, env=python_env(),
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    new_id = printed.stdout.strip()
    assert len(new_id) == 26 and new_id != ev["chain_id"]


def test_submit_wait_undecodable_chain_with_an_id_is_rejected(dev: Dev, tmp_path: Path) -> None:
    bad = {"id": "cli-no-messages", "steps": [{"kind": "llm", "id": "a", "model": "gpt-4o-mini"}]}
    r = submit(dev, bad, tmp_path / "no-messages.json")
    assert r.returncode == 1, (r.stdout, r.stderr)
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["type"] == "chain.rejected"
    assert "rejected: $.steps[0]: Object missing required field `messages`" in r.stderr
