"""`chainyard gateway` as a command: bad flags, no NATS, a taken port each end with one line
and their exit code; with a NATS it serves until SIGTERM and exits 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import httpx
from helpers import python_env

from chainyard.runtime.server import NatsServer

CONFIG = """
[[deployments]]
name = "d"
pool = "p"
model = "m"

[[pools]]
name = "p"
base_url = "http://127.0.0.1:9/v1"
"""


async def gateway(*args: str, timeout: float = 30) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.cli", "gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=python_env(),
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:  # (a test that failed leaves no process behind)
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_bad_key_spec_and_config_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    code, out = await gateway("--config", str(cfg), "--key", "no-tenant")
    assert code == 2 and "--key 'no-tenant': expected KEY=TENANT" in out
    for tenant in ("acme.eu", "*", ">"):  # not a subject token: it would reach other tenants
        code, out = await gateway("--config", str(cfg), "--key", f"sk-x={tenant}")
        assert code == 2 and f"--key for tenant {tenant!r}: tenant" in out, out
    code, out = await gateway("--config", str(tmp_path / "missing.toml"), "--open")
    assert code == 2 and "cannot read the config file" in out


async def test_unreachable_nats_is_said_once_and_sigterm_stops_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"nats://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.cli", "gateway", "--config", str(cfg), "--open",
        "--nats", url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=python_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    said = ""
    while "retrying until it is up" not in said:
        said = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert f"cannot reach NATS at {url}" in said
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 4
    assert "stopped before NATS" in out.decode()


async def test_serves_until_sigterm_and_refuses_a_taken_port(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    args = ["--config", str(cfg), "--open", "--nats", nats_server.url, "--port", "0"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.cli", "gateway", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=python_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        url = line.rsplit(" ", 1)[-1].strip()
        assert line.startswith("chainyard gateway: listening on http://127.0.0.1:"), line
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/readyz")).text == "ready\n"
            models = (await http.get(f"{url}/v1/models")).json()
            assert {m["id"] for m in models["data"]} == {"m", "d"}
        port = url.rsplit(":", 1)[-1]
        code, out = await gateway(*args[:-1], port)
        assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in out
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_dev_starts_a_gateway_and_prints_its_url() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.cli", "dev", "--no-local", "--port", "0",
        "--gateway-port", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=python_env(),
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = ""
        while "HTTP gateway at" not in line:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "dev ended without printing the gateway's URL"
        base = line.split("HTTP gateway at ", 1)[1].split()[0]
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(
                f"{base}/chat/completions",
                json={"model": "small", "messages": [{"role": "user", "content": "dev says"}]},
            )
        assert r.json()["choices"][0]["message"]["content"] == "echo: dev says"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_dev_stack_takes_another_port_when_the_gateway_port_is_taken() -> None:
    from chainyard.demo import demo_config, tools
    from chainyard.devstack import DevStack

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stack = DevStack(demo_config(), local_model=False, tools=tools, gateway_port=port)
        async with stack as dev, httpx.AsyncClient() as http:
            assert not dev.gateway_url.endswith(f":{port}")
            assert (await http.get(f"{dev.gateway_url}/healthz")).status_code == 200
