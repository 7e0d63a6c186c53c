"""The fault suite's machinery: service processes, load, waiting on the ledger's conditions.

Router and workers are OS processes started through the CLI (`python -m chaos_hooks`, which is
the CLI plus optional crash hooks). Every process is registered in a `Procs` and killed in a
finally. Nothing sleeps to hope: waits are on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import wait_until
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from chainyard.contracts import Chain, LlmStep, Message, ToolStep, Topology, encode
from chainyard.ledger import Report, audit
from chainyard.runtime.nats import Bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TENANT = "acme"
SHORT = os.environ.get("CHAOS_SHORT", "") not in ("", "0")


def scale(full: int, short: int) -> int:
    return short if SHORT else full


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    path: Path,
    sandbox_url: str,
    *,
    ack_wait_s: float = 2.0,
    max_attempts: int = 3,
    replicas: int = 1,
    slots: int = 32,
    timeout_s: float = 30.0,
    api_key_env: str | None = None,
) -> Path:
    key = f'api_key_env = "{api_key_env}"\n' if api_key_env else ""
    path.write_text(
        f"""
work_ack_wait_s = {ack_wait_s}
max_attempts = {max_attempts}
replicas = {replicas}
tools = ["gate"]

[[deployments]]
name = "d-sim"
pool = "sim"
model = "m"
price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}

[[pools]]
name = "sim"
provider = "openai"
base_url = "{sandbox_url}/v1"
slots = {slots}
timeout_s = {timeout_s}
{key}"""
    )
    return path


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    role: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def kill(self) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        return await asyncio.wait_for(self.proc.wait(), 10)

    async def stop(self, limit_s: float = 20.0) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), limit_s)
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"{self.role} pid {self.pid} ignored SIGTERM for {limit_s} s"
            ) from None


@dataclass
class Procs:
    """Service processes of one scenario; `close()` (in a finally) leaves none behind."""

    url: str
    config: Path
    logdir: Path
    env: dict[str, str] = field(default_factory=dict)
    all: list[Proc] = field(default_factory=list)
    _n: int = 0

    async def start(
        self, role: str, *args: str, env: dict[str, str] | None = None, url: str | None = None
    ) -> Proc:
        self._n += 1
        log = self.logdir / f"{self._n:02d}-{role}.log"
        e = dict(os.environ)
        e["PYTHONUNBUFFERED"] = "1"
        e["PYTHONPATH"] = os.pathsep.join([str(HERE), e.get("PYTHONPATH", "")])
        e.update(self.env)
        e.update(env or {})
        cmd = role.split("-")[0]
        with log.open("wb") as out:
            p = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "chaos_hooks",
                cmd,
                "--nats",
                url or self.url,
                "--config",
                str(self.config),
                *args,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=e,
            )
        proc = Proc(role, p, log)
        self.all.append(proc)
        return proc

    async def router(self, **kw: Any) -> Proc:
        return await self.start("router", **kw)

    async def worker(self, pool: str = "sim", **kw: Any) -> Proc:
        return await self.start(f"worker-{pool}", "--pool", pool, **kw)

    async def tools(self, **kw: Any) -> Proc:
        return await self.start("worker-tools", "--tools", "chaos_tools:tools", **kw)

    def logs(self) -> str:
        return "\n".join(
            f"== {p.log.name}\n{p.log.read_text(errors='replace')[-3000:]}" for p in self.all
        )

    def assert_alive(self, *procs: Proc) -> None:
        for p in procs or tuple(self.all):
            assert p.running, (
                f"{p.role} pid {p.pid} exited {p.proc.returncode}:\n{p.log.read_text()[-3000:]}"
            )

    async def close(self) -> None:
        for p in self.all:
            if p.running:
                with contextlib.suppress(Exception):
                    await p.kill()


# -- chains and load -------------------------------------------------------------------------


def llm_chain(cid: str, text: str = "hello", steps: int = 2) -> Chain:
    s: list[LlmStep | ToolStep] = [
        LlmStep(id="a", model="m", messages=[Message(role="user", content=f"{text} {cid}")])
    ]
    for i in range(1, steps):
        prev = s[-1].id
        s.append(
            LlmStep(
                id=chr(ord("a") + i),
                model="m",
                messages=[Message(role="user", content=f"next {{{{steps.{prev}.output}}}}")],
            )
        )
    return Chain(id=cid, steps=s)


def tool_chain(cid: str) -> Chain:
    return Chain(id=cid, steps=[ToolStep(id="t", tool="gate", args={"key": cid})])


@dataclass
class Load:
    """Submits chains and keeps the list of what the intake accepted (publish acknowledged).

    A publish that fails (server down, leader election, no responders) is retried with the same
    `Nats-Msg-Id` until `give_up_s`; one that never got its ack is not in `accepted`.
    """

    js: JetStreamContext
    tenant: str = TENANT
    topology: Topology = field(default_factory=Topology)
    give_up_s: float = 60.0
    accepted: set[tuple[str, str]] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    publish_errors: int = 0

    async def submit(self, chain: Chain) -> bool:
        data = encode(chain)
        deadline = time.monotonic() + self.give_up_s
        delay = 0.05
        while True:
            try:
                await self.js.publish(
                    self.topology.subjects.submit(self.tenant),
                    data,
                    headers={"Nats-Msg-Id": chain.id},
                    timeout=5.0,
                )
                self.accepted.add((self.tenant, chain.id))
                return True
            except Exception as e:
                self.publish_errors += 1
                if time.monotonic() > deadline:
                    self.failed[chain.id] = repr(e)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def run(self, chains: list[Chain], concurrency: int = 64) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(c: Chain) -> None:
            async with sem:
                await self.submit(c)

        await asyncio.gather(*(one(c) for c in chains))


async def ended_ids(js: JetStreamContext, topology: Topology | None = None) -> set[tuple[str, str]]:
    """(tenant, chain) of every chain with a terminal event in the event stream."""
    topology = topology or Topology()
    p = topology.subjects.prefix
    info = await js.stream_info(topology.events.name, subjects_filter=f"{p}.events.*.*.chain.*")
    out = set()
    for subject in info.state.subjects or {}:
        parts = subject.split(".")
        out.add((parts[2], parts[3]))
    return out


async def wait_all_ended(
    js: JetStreamContext,
    want: set[tuple[str, str]] | Callable[[], set[tuple[str, str]]],
    limit_s: float,
) -> set[tuple[str, str]]:
    """Wait until every chain in `want` has a terminal event; returns those that did not.

    It does not raise: the ledger that follows is the judge, and reports them as lost."""
    deadline = time.monotonic() + limit_s
    missing: set[tuple[str, str]] = set()
    while True:
        target = want() if callable(want) else want
        try:
            missing = target - await ended_ids(js)
        except Exception:  # the server is restarting: ask again
            missing = missing or target
        if not missing or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(0.25)


wait_count = wait_until  # the suite's name for the shared poll-until-true helper


async def work_queue_empty(js: JetStreamContext, topology: Topology | None = None) -> bool:
    topology = topology or Topology()
    info = await js.stream_info(topology.work.name)
    return info.state.messages == 0


async def heartbeat(nc: NatsClient, pool: str, limit_s: float = 30.0) -> None:
    """Wait until a worker of `pool` has written a heartbeat (it is consuming)."""
    js = nc.jetstream()
    kv = await js.key_value(Topology().capacity_kv.bucket)

    async def seen() -> bool:
        try:
            keys = await kv.keys()
        except Exception:
            return False
        return any(k.startswith(pool + ".") for k in keys)

    await wait_count(seen, limit_s, f"a heartbeat from pool {pool}", interval=0.1)


def rng(seed: int) -> random.Random:
    return random.Random(seed)


async def progress(js: JetStreamContext, n: int, limit_s: float) -> None:
    """Wait until at least `n` chains have ended (load is flowing)."""

    async def enough() -> bool:
        try:
            return len(await ended_ids(js)) >= n
        except Exception:
            return False

    await wait_count(enough, limit_s, f"{n} chains to end", interval=0.1)


async def gather_cancel(*aws: Awaitable[Any]) -> list[Any]:
    return list(await asyncio.gather(*aws))


# -- ledger and stack ------------------------------------------------------------------------

REPORTS: list[tuple[str, Report, float]] = []


@dataclass
class Ledger:
    nodeid: str
    started: float = field(default_factory=time.monotonic)
    reports: list[Report] = field(default_factory=list)

    async def audit(
        self,
        bus: Bus,
        accepted: Any,
        *,
        name: str = "",
        notes: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Report:
        scenario = name or self.nodeid.split("::")[-1].removeprefix("test_")
        r = await audit(bus.js, accepted, topology=bus.topology, scenario=scenario, **kw)
        r.notes.update(notes or {})
        REPORTS.append((scenario, r, time.monotonic() - self.started))
        self.reports.append(r)
        assert r.ok, r.details()
        return r


@dataclass
class Stack:
    server: NatsServer
    sandbox: SandboxServer
    bus: Bus
    procs: Procs
    load: Load
    dir: Path
    config: Path

    @property
    def topology(self) -> Topology:
        return self.bus.topology
