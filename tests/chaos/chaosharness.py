"""The fault suite's machinery: service processes, load, waiting on the ledger's conditions.

Router and workers are OS processes started through the CLI (`python -m chaos_hooks`, which is
the CLI plus optional crash hooks). Every process is registered in a `Procs` and killed in a
finally. Nothing sleeps to hope: waits are on conditions with deadlines.

The deployment users run is the default of every scenario (`Stack.deploy`): two router
replicas, three LLM workers over two pools that serve one model, and load from two tenants
that use the same chain ids, in chains with fan-out, fan-in and references (`diamond`,
`tool_diamond`). The final text of each chain is computed here from the sandbox's echo model
(`expected_output`), so the ledger checks every completed chain's answer is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chaos_summary
from helpers import heartbeats_from, wait_until
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from chainyard.contracts import Chain, LlmStep, Message, ToolStep, Topology, encode
from chainyard.ledger import Report, audit
from chainyard.runtime.nats import Bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TENANTS = ("ta", "tb")  # two tenants that use the same chain ids
TENANT = TENANTS[0]
Key = tuple[str, str]  # (tenant, chain id)
SHORT = os.environ.get("CHAOS_SHORT", "") not in ("", "0")


def scale(full: int, short: int) -> int:
    return short if SHORT else full


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
    pools: int = 1,
) -> Path:
    """Pool `sim` (and with pools=2 `sim2`, as the stack fixture has it), each with a
    deployment of model `m` on the sandbox: the router spreads a step over both, as over one
    model group of two providers."""
    key = f'api_key_env = "{api_key_env}"\n' if api_key_env else ""
    names = ["sim", "sim2"][:pools]
    body = "".join(
        f"""
[[deployments]]
name = "d-{p}"
pool = "{p}"
model = "m"
price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}

[[pools]]
name = "{p}"
provider = "openai"
base_url = "{sandbox_url}/v1"
slots = {slots}
timeout_s = {timeout_s}
{key}"""
        for p in names
    )
    path.write_text(
        f"""
work_ack_wait_s = {ack_wait_s}
max_attempts = {max_attempts}
replicas = {replicas}
tools = ["gate", "nap", "crash"]
{body}"""
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
    peak: dict[str, int] = field(default_factory=dict)  # most running at once, per kind
    _n: int = 0

    def __post_init__(self) -> None:
        # The summary line names the deployment each scenario ran (routers=2-3 workers=3-4).
        if (sess := chaos_summary.session()) is not None and sess.current is not None:
            sess.current.procs.append(self)

    def running(self, kind: str) -> list[Proc]:
        return [p for p in self.all if p.running and _kind(p.role) == kind]

    def _count(self, kind: str) -> None:
        self.peak[kind] = max(self.peak.get(kind, 0), len(self.running(kind)))

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
                preexec_fn=_die_with_parent,
            )
        proc = Proc(role, p, log)
        self.all.append(proc)
        self._count(_kind(role))
        return proc

    async def router(self, **kw: Any) -> Proc:
        return await self.start("router", **kw)

    async def worker(self, pool: str = "sim", **kw: Any) -> Proc:
        return await self.start(f"worker-{pool}", "--pool", pool, **kw)

    async def tools(self, registry: str = "chaos_tools:tools", **kw: Any) -> Proc:
        return await self.start("worker-tools", "--tools", registry, **kw)

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


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the test process dies, even by SIGKILL, so
    a stopped session leaves no service process behind (Linux; elsewhere a no-op)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _kind(role: str) -> str:
    return "router" if role == "router" else "worker"


# -- chains and load -------------------------------------------------------------------------


def llm_chain(cid: str, text: str = "hello", steps: int = 2) -> Chain:
    """A straight line of LLM steps, each referring to the one before."""
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


def _llm(sid: str, text: str) -> LlmStep:
    return LlmStep(id=sid, model="m", messages=[Message(role="user", content=text)])


def diamond(tenant: str, cid: str, *, deadline_ms: int | None = None) -> Chain:
    """Fan-out and fan-in with references: a -> (b, c) -> d. The tenant is in the text, so a
    chain that got another tenant's output (same id) has the wrong answer."""
    return Chain(
        id=cid,
        deadline_ms=deadline_ms,
        steps=[
            _llm("a", f"plan {tenant} {cid}"),
            _llm("b", "left {{steps.a.output}}"),
            _llm("c", "right {{steps.a.output}}"),
            _llm("d", "join {{steps.b.output}} and {{steps.c.output}}"),
        ],
    )


def tool_diamond(
    tenant: str, cid: str, tool: str = "gate", *, deadline_ms: int | None = None, **args: Any
) -> Chain:
    """a -> (tool t, llm c) -> d: a tool step in the fan-out, its output referred to by d."""
    return Chain(
        id=cid,
        deadline_ms=deadline_ms,
        steps=[
            _llm("a", f"plan {tenant} {cid}"),
            ToolStep(
                id="t",
                tool=tool,
                args={"key": f"{tenant}-{cid}", "note": "{{steps.a.output}}", **args},
            ),
            _llm("c", "check {{steps.a.output}}"),
            _llm("d", "done {{steps.t.output.note}} and {{steps.c.output}}"),
        ],
    )


def tool_chain(cid: str, tenant: str = TENANT) -> Chain:
    return Chain(id=cid, steps=[ToolStep(id="t", tool="gate", args={"key": f"{tenant}-{cid}"})])


_REF = re.compile(r"\{\{\s*steps\.([A-Za-z0-9_-]+)\.output((?:\.[A-Za-z0-9_-]+)*)\s*\}\}")


def expected_output(chain: Chain) -> str | None:
    """The final text the chain's steps produce with the sandbox's echo model ("echo: " + the
    last message, whitespace folded) and the chaos tools (`note` comes back as it went); None
    for a chain with anything else in it."""
    outs: dict[str, Any] = {}

    def value(m: re.Match[str]) -> str:
        v = outs[m.group(1)]
        for k in filter(None, m.group(2).split(".")):
            v = v[k]
        return str(v)

    for step in chain.steps:
        if isinstance(step, LlmStep) and step.loop is None and not step.tools:
            text = _REF.sub(value, step.messages[-1].content)
            outs[step.id] = " ".join(f"echo: {text}".split())
        elif isinstance(step, ToolStep) and step.tool in ("gate", "nap"):
            outs[step.id] = {k: _REF.sub(value, v) for k, v in step.args.items() if k == "note"}
        else:
            return None
    out = outs[chain.output_step]
    return out if isinstance(out, str) else None


def pairs(
    prefix: str, n: int, make: Callable[..., Chain] = diamond, **kw: Any
) -> list[tuple[str, Chain]]:
    """n chain ids, each used by both tenants: (ta, <prefix>-0000), (tb, <prefix>-0000), ..."""
    return [(t, make(t, f"{prefix}-{i:04d}", **kw)) for i in range(n) for t in TENANTS]


@dataclass
class Load:
    """Submits chains and keeps the list of what the intake accepted (publish acknowledged).

    No `Nats-Msg-Id`: the intake stream's ids are not per tenant (the router's KV create is the
    dedup). A publish that fails (server down, leader election, no responders) is retried until
    `give_up_s`; if the first try was stored after all, the router accepts the same chain once.
    One that never got its ack is not in `accepted`.
    """

    js: JetStreamContext
    tenant: str = TENANT
    topology: Topology = field(default_factory=Topology)
    give_up_s: float = 60.0
    accepted: set[Key] = field(default_factory=set)
    outputs: dict[Key, str] = field(default_factory=dict)  # the final text each chain must have
    failed: dict[str, str] = field(default_factory=dict)
    publish_errors: int = 0

    async def submit(self, chain: Chain, tenant: str | None = None) -> bool:
        tenant = tenant or self.tenant
        data = encode(chain)
        deadline = time.monotonic() + self.give_up_s
        delay = 0.05
        while True:
            try:
                await self.js.publish(self.topology.subjects.submit(tenant), data, timeout=5.0)
                self.accepted.add((tenant, chain.id))
                if (out := expected_output(chain)) is not None:
                    self.outputs[(tenant, chain.id)] = out
                return True
            except Exception as e:
                self.publish_errors += 1
                if time.monotonic() > deadline:
                    self.failed[f"{tenant}/{chain.id}"] = repr(e)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def run(
        self,
        chains: Sequence[Chain | tuple[str, Chain]],
        concurrency: int = 64,
        rate: float | None = None,
    ) -> None:
        """Submit chains (this Load's tenant's, or (tenant, chain) pairs), some at once; with
        `rate`, at most that many per second, as clients arriving over time would."""
        sem = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one(i: int, c: Chain | tuple[str, Chain]) -> None:
            if rate:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))  # the pace
            async with sem:
                if isinstance(c, tuple):
                    await self.submit(c[1], c[0])
                else:
                    await self.submit(c)

        await asyncio.gather(*(one(i, c) for i, c in enumerate(chains)))


TERMINAL = ("completed", "failed", "cancelled")


async def ended_ids(
    js: JetStreamContext, topology: Topology | None = None, *, rejected: bool = False
) -> set[Key]:
    """(tenant, chain) of every chain with a terminal event in the event stream; with
    `rejected`, a chain.rejected counts too (an id_in_use rejection does not end a chain)."""
    topology = topology or Topology()
    p = topology.subjects.prefix
    info = await js.stream_info(topology.events.name, subjects_filter=f"{p}.events.*.*.chain.*")
    kinds = (*TERMINAL, "rejected") if rejected else TERMINAL
    out = set()
    for subject in info.state.subjects or {}:
        parts = subject.split(".")
        if parts[-1] in kinds:
            out.add((parts[2], parts[3]))
    return out


async def wait_all_ended(
    js: JetStreamContext,
    want: set[Key] | Callable[[], set[Key]],
    limit_s: float,
    *,
    or_rejected: set[Key] | None = None,
) -> set[Key]:
    """Wait until every chain in `want` has a terminal event (those in `or_rejected` may end in
    a chain.rejected instead); returns those that did not.

    It does not raise: the ledger that follows is the judge, and reports them as lost."""
    deadline = time.monotonic() + limit_s
    missing: set[Key] = set()
    while True:
        target = want() if callable(want) else want
        try:
            ended = await ended_ids(js)
            if or_rejected:
                ended |= await ended_ids(js, rejected=True) & or_rejected
            missing = target - ended
        except Exception:  # the server is restarting: ask again
            missing = missing or target
        if not missing or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(0.25)


wait_count = wait_until  # the suite's name for the shared poll-until-true helper


async def heartbeat(nc: NatsClient, pool: str, limit_s: float = 30.0) -> None:
    """Wait until a worker of `pool` has written a heartbeat (it is consuming)."""
    js = nc.jetstream()
    kv = await js.key_value(Topology().capacity_kv.bucket)

    await wait_count(
        lambda: heartbeats_from(kv, [pool]), limit_s, f"a heartbeat from pool {pool}", interval=0.1
    )


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


# -- ledger and stack ------------------------------------------------------------------------


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
        tenants = {t for t, _ in set(accepted)}
        r.notes["tenants"] = len(tenants)
        self.reports.append(r)
        if (sess := chaos_summary.session()) is not None and sess.current is not None:
            sess.current.reports.append(r)
        assert r.ok, r.details()
        return r


@dataclass
class Deployment:
    routers: list[Proc]
    workers: list[Proc]
    tools: list[Proc]


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

    @property
    def pools(self) -> list[str]:
        from chainyard.contracts import load_config

        return [p.name for p in load_config(self.config).pools]

    async def deploy(
        self,
        routers: int = 2,
        workers: int = 3,
        tools: int = 0,
        *,
        router_env: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
        tools_env: dict[str, str] | None = None,
    ) -> Deployment:
        """The deployment users run: router replicas, LLM workers spread over the pools (sim,
        sim2, sim, ...), and optional tool workers; returns once every pool has a heartbeat."""
        pools = self.pools
        d = Deployment(
            [await self.procs.router(env=router_env) for _ in range(routers)],
            [
                await self.procs.worker(pools[i % len(pools)], env=worker_env)
                for i in range(workers)
            ],
            [await self.procs.tools(env=tools_env) for _ in range(tools)],
        )
        for p in pools[: max(workers, 1)] if workers else []:
            await heartbeat(self.bus.nc, p)
        if tools:
            await heartbeat(self.bus.nc, "tool.gate")
        return d

    async def worker_like(self, victim: Proc, **kw: Any) -> Proc:
        """A fresh worker in the dead one's pool (or a tool worker for a tool worker)."""
        if victim.role == "worker-tools":
            return await self.procs.tools(**kw)
        return await self.procs.worker(victim.role.removeprefix("worker-"), **kw)

    async def audit(self, ledger: Ledger, **kw: Any) -> Report:
        """The ledger over what this stack's load had accepted, final texts included."""
        notes = {"publish_retries": self.load.publish_errors} if self.load.publish_errors else {}
        notes.update(kw.pop("notes", {}))
        kw.setdefault("outputs", self.load.outputs)
        return await ledger.audit(self.bus, self.load.accepted, notes=notes, **kw)
