"""Every CLI verb ends with an answer, and every failure says why: run as a user runs them
(separate processes, a `chainyard dev` stack), each checked for its message and exit code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dev_process import CLI, Dev, dev, start_dev, stop_dev
from helpers import free_port, free_ports, python_env

from chainyard import cli

__all__ = ["dev"]

# The console script, as a user runs it: unlike `python -m`, it does not put the current
# directory on sys.path.
SCRIPT = str(Path(sys.executable).parent / "chainyard")


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**python_env(), **(env or {})},
        cwd=cwd,
    )


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The failure's message: exactly one line on stderr, and no traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def submit(dev: Dev, chain: dict, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp / f"{chain['id']}.json"
    path.write_text(json.dumps(chain))
    return run("submit", str(path), "--nats", dev.url, *extra)


def waiting(chain_id: str) -> dict:
    return {"id": chain_id, "steps": [{"kind": "wait", "id": "approval", "signal": "approval"}]}


# -- one default port ------------------------------------------------------------------------


def test_client_verbs_default_to_4222_and_read_chainyard_nats(monkeypatch) -> None:
    monkeypatch.delenv("CHAINYARD_NATS", raising=False)
    p = cli.parser()
    for verb in (["submit", "f"], ["watch", "c"], ["cancel", "c"], ["status"], ["router"]):
        assert p.parse_args(verb).nats == "nats://127.0.0.1:4222"
    assert p.parse_args(["dev"]).port == 4222  # where `dev` puts NATS when it is free
    monkeypatch.setenv("CHAINYARD_NATS", "nats://10.0.0.1:4333")
    p = cli.parser()
    assert p.parse_args(["status"]).nats == "nats://10.0.0.1:4333"
    assert p.parse_args(["status", "--nats", "nats://h:1"]).nats == "nats://h:1"
    # dev does not read it: it is where clients find a dev stack, not where a new one connects
    assert p.parse_args(["dev"]).nats is None


def test_dev_takes_its_port_when_free_and_says_when_it_is_not(tmp_path: Path) -> None:
    port, metrics = free_ports(2)
    d = start_dev(tmp_path / "a.log", "--port", str(port), "--metrics-port", str(metrics))
    try:
        assert d.url == f"nats://127.0.0.1:{port}"
        assert "in use" not in d.out
        assert f"point clients at it: export CHAINYARD_NATS={d.url}" in d.out
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
            assert b"chainyard_steps_routed_total" in resp.read()
        # a second stack finds the port taken, says so, and prints the URL it used instead
        d2 = start_dev(tmp_path / "b.log", "--port", str(port))
        try:
            assert d2.url != d.url
            assert f"port {port} is in use" in d2.out
            assert f"export CHAINYARD_NATS={d2.url}" in d2.out
            r = run("status", env={"CHAINYARD_NATS": d2.url})  # no --nats: the variable
            assert (r.returncode, r.stdout.strip()) == (
                0,
                "no chains in flight for tenant 'default'",
            )
        finally:
            assert stop_dev(d2) == 0
    finally:
        assert stop_dev(d) == 0


# -- NATS unreachable ------------------------------------------------------------------------


def test_a_client_verb_without_nats_says_so() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    r = run("status", "--nats", url)
    assert r.returncode == 4
    assert one_line(r) == (
        f"chainyard status: cannot reach NATS at {url} ([Errno 111] Connection refused): start "
        "it with `chainyard dev` (it prints the URL to use), or point --nats or CHAINYARD_NATS "
        "at yours"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_service_waiting_for_nats_stops_at_once_on_a_signal(tmp_path: Path, sig: int) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[deployments]]\nname = "d"\npool = "p"\nmodel = "m"\n')
    url = f"nats://127.0.0.1:{free_port()}"
    p = subprocess.Popen(
        [*CLI, "router", "--config", str(cfg), "--nats", url],
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
    )
    assert p.stderr is not None
    first = p.stderr.readline()  # it says what it waits for, then keeps trying
    assert f"cannot reach NATS at {url}" in first and "retrying until it is up" in first
    p.send_signal(sig)
    t0 = time.monotonic()
    rc = p.wait(10)
    assert time.monotonic() - t0 < 5
    rest = p.stderr.read()
    assert rc == 4
    assert rest.strip().splitlines()[-1] == (
        f"chainyard router: stopped before NATS at {url} could be reached"
    )
    assert "Traceback" not in rest


# -- configuration, tools --------------------------------------------------------------------


def test_a_bad_config_is_one_line_with_file_field_and_value(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[pools]]\nname = "p"\nslots = "many"\n')
    r = run("router", "--config", str(cfg))
    assert r.returncode == 2
    assert one_line(r) == (
        f"chainyard router: {cfg}: $.pools[0].slots = 'many': Expected `int`, got `str`"
    )
    r = run("worker", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2
    assert one_line(r) == (
        f"chainyard worker: {tmp_path / 'missing.toml'}: cannot read the config file: "
        "No such file or directory"
    )


def test_router_and_worker_refuse_to_start_without_a_config() -> None:
    for verb, names in (("worker", "the pools to serve"), ("router", "the deployments")):
        r = run(verb)
        assert r.returncode == 2
        line = one_line(r)
        assert line.startswith(f"chainyard {verb}: --config FILE is required: it names {names}")
        assert "`chainyard dev`" in line


TOOLS_MODULE = '''
from chainyard.workers.tools import Tools

tools = Tools()


@tools.tool
def shout(text: str) -> str:
    """Upper case."""
    return text.upper()
'''


def test_tools_import_from_the_current_directory(dev: Dev, tmp_path: Path) -> None:
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "tools.py").write_text(TOOLS_MODULE)
    env = {k: v for k, v in python_env().items() if k != "PYTHONPATH"}
    missing = subprocess.run(
        [SCRIPT, "worker", "--tools", "nopkg.tools:tools", "--nats", dev.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert missing.returncode == 2
    assert one_line(missing) == (
        "chainyard worker: --tools nopkg.tools:tools: No module named 'nopkg' "
        f"(imported from {tmp_path} and the installed packages)"
    )
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [SCRIPT, "worker", "--tools", "mypkg.tools:tools", "--nats", dev.url],
        stderr=log.open("wb"),
        cwd=tmp_path,
        env=env,
    )
    try:
        # Until the router has seen the new worker's first heartbeat, the tool is unknown to
        # it (the chain is rejected, and says so): submit until it is known, within 20 s.
        deadline = time.monotonic() + 20
        for i in range(1000):
            chain = {"id": f"shout-{i}", "steps": [{"kind": "tool", "id": "s", "tool": "shout",
                                                     "args": {"text": "hi"}}]}  # fmt: skip
            r = submit(dev, chain, tmp_path, "--wait", "--timeout", "60")
            if "no worker serves pool 'tool.shout'" not in r.stderr:
                break
            assert time.monotonic() < deadline, log.read_text()
        assert r.returncode == 0, (r.stderr, log.read_text())
        assert json.loads(r.stdout)["output"]["text"] == "HI"  # a str result is text
        assert "serving on" in log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, log.read_text()


# -- waits end, and say what they waited for -------------------------------------------------


def test_watch_of_an_unknown_chain_or_tenant_says_so(dev: Dev, tmp_path: Path) -> None:
    r = run("watch", "no-such-chain", "--nats", dev.url)
    assert r.returncode == 1
    assert one_line(r) == (
        "chainyard watch: no chain 'no-such-chain' for tenant 'default': no state and no events "
        "after 5 s; check the id and --tenant (or CHAINYARD_TENANT)"
    )
    assert submit(dev, waiting("w-known"), tmp_path, "--tenant", "acme").returncode == 0
    r = run("watch", "w-known", "--nats", dev.url)  # right id, wrong (default) tenant
    assert r.returncode == 1 and "no chain 'w-known' for tenant 'default'" in one_line(r)
    r = run("watch", "w-known", "--nats", dev.url, "--tenant", "acme", "--timeout", "1")
    assert r.returncode == 3
    assert one_line(r) == (
        "chainyard watch: chain 'w-known' (tenant 'acme') did not end within 1 s; it is still "
        "running (`chainyard status` shows its steps; --timeout 0 waits without limit)"
    )


def test_submit_wait_timeout_names_the_chain(dev: Dev, tmp_path: Path) -> None:
    r = submit(dev, waiting("w-slow"), tmp_path, "--wait", "--timeout", "1")
    assert r.returncode == 3
    assert one_line(r) == (
        "chainyard submit: chain 'w-slow' did not end within 1.0 s (tenant 'default'); it may "
        "still be running: `chainyard watch ID --tenant default` or `chainyard status`"
    )


def test_control_verbs_wait_for_the_routers_answer(dev: Dev, tmp_path: Path) -> None:
    assert submit(dev, waiting("c-1"), tmp_path).returncode == 0
    nats = ("--nats", dev.url)
    r = run("signal", "c-1", "approval", "--data", '{"ok": true}', *nats)
    assert (r.returncode, r.stdout.strip()) == (
        0,
        "signal accepted for chain 'c-1' (tenant 'default'): signal 'approval' released 'approval'",
    ), r.stderr
    # the chain has ended: a cancel is refused, with the router's reason
    r = run("cancel", "c-1", *nats)
    assert r.returncode == 1
    assert one_line(r) == (
        "chainyard cancel: refused for chain 'c-1' (tenant 'default'): chain 'c-1' already "
        "ended (completed)"
    )
    # replay --wait of a step the chain does not have: the refusal at once, not a long wait
    t0 = time.monotonic()
    r = run("replay", "c-1", "nope", "--wait", *nats)
    assert time.monotonic() - t0 < 20
    assert r.returncode == 1
    assert one_line(r) == (
        "chainyard replay: refused for chain 'c-1' (tenant 'default'): chain 'c-1' has no step "
        "'nope'"
    )
    r = run("replay", "c-1", "approval", "--new-id", "c-1-r", *nats)
    assert (r.returncode, r.stdout.strip()) == (0, "c-1-r")
    assert submit(dev, waiting("c-2"), tmp_path).returncode == 0
    r = run("cancel", "c-2", "--reason", "not needed", *nats)
    assert (r.returncode, r.stdout.strip()) == (
        0,
        "cancel accepted for chain 'c-2' (tenant 'default'): cancelled",
    ), r.stderr
    r = run("watch", "c-2", *nats)  # the end is in the log already
    assert r.returncode == 0
    assert json.loads(r.stdout.strip().splitlines()[-1])["type"] == "chain.cancelled"


def test_control_of_an_unknown_chain_is_refused(dev: Dev) -> None:
    r = run("cancel", "ghost", "--nats", dev.url)  # the router waits ~6 s for it to appear
    assert r.returncode == 1
    assert (
        one_line(r)
        == "chainyard cancel: refused for chain 'ghost' (tenant 'default'): no such chain"
    )
    r = run("signal", "ghost", "go", "--data", "{oops", "--nats", dev.url)
    assert r.returncode == 2 and one_line(r).startswith("chainyard signal: --data is not JSON")


def test_submit_of_a_missing_file_says_so(tmp_path: Path) -> None:
    r = run("submit", str(tmp_path / "nope.json"))
    assert r.returncode == 2
    assert one_line(r) == (
        f"chainyard submit: cannot read {tmp_path / 'nope.json'}: No such file or directory"
    )


def test_help_names_the_default_url() -> None:
    r = run("submit", "--help")
    assert r.returncode == 0 and "nats://127.0.0.1:4222" in r.stdout
    assert os.environ.get("CHAINYARD_NATS") is None or "CHAINYARD_NATS" in r.stdout
