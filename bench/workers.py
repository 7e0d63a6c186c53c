"""Worker figures: HTTP steps through NATS vs a bare client, and 10,000 calls in flight.

Every process is separate: nats-server (embedded binary), the provider sandbox (its own Python
process, uvloop, no request capture, backlog 4096), the worker (`chainyard worker`, uvloop) and
this driver, which preloads the work stream, counts `step.completed` events on a core
subscription and samples the worker's RSS from /proc. On 2+ cores the sandbox is pinned to the
last core and the worker (or the bare client loop) to the first; nats-server and this driver
float. Throughput is measured between the first and the last completion, so start-up is out.

- `worker_http_vs_bare_client_c256`: steps/s of one worker with 256 slots against the
  zero-latency OpenAI sandbox, vs the fastest bare client loop (bench.http_clients: aiohttp, the
  provider client) at concurrency 256 against the same sandbox process, three rounds alternating
  (the median round vs each client's median rate: one round swung by +-0.05 here). Goal >= 0.8.
  The conditions repeat both against the load sandbox (chainyard.sandbox.load), where the client
  side is what limits: the worker's CPU per step against a bare request's.
- the worker's CPU per provider call at a user's load (1,000 calls/s, 200 ms each) is
  bench.provider_calls' figure.
- `inflight_10k_rss_mb`: peak RSS of one worker holding 10,000 calls to a sandbox that answers
  after 1 s, vs the same worker's RSS idle (goal in conditions: <= 1024 MB), and
  `inflight_10k_steps_per_s`: its throughput vs in-flight / latency (10,000/s at 10,000 slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from chainyard.contracts import Assignment, LlmStep, Message, Target, encode
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer

from .core import Ctx, Figure, benchmark
from .http_clients import measure as measure_clients

TENANT = "bench"
POOL = "sim"
_SANDBOX = """
import asyncio, os, sys
import uvloop
from aiohttp import web
from chainyard.sandbox import SandboxConfig, make_app
from chainyard.sandbox._core import State

async def main(latency_ms):
    state = State(SandboxConfig(latency_ms=latency_ms, capture=0, limit_requests=10**9))
    runner = web.AppRunner(make_app(state), access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()

uvloop.run(main(float(sys.argv[1])))
"""


def _cores() -> tuple[set[int], set[int]] | None:
    """(worker/client cores, sandbox cores) when pinning is possible."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, {cpus[-1]}) if len(cpus) >= 2 else None


def _pin(pid: int, cores: set[int] | None) -> None:
    if cores:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cores)


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


async def _stop(proc: asyncio.subprocess.Process, grace_s: float = 20.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def sandbox(
    latency_ms: float, cores: set[int] | None, load: bool = False
) -> AsyncIterator[tuple[str, int]]:
    """The provider sandbox in its own process: (base URL without /v1, pid). `load`: the load
    sandbox (chainyard.sandbox.load, ~20 us a request) in place of the full one (~230 us)."""
    args = ("-m", "chainyard.sandbox.load", "--latency-ms") if load else ("-c", _SANDBOX)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, str(latency_ms),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _pin(proc.pid, cores)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        yield f"http://127.0.0.1:{int(line)}", proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        await _stop(proc, 5)


@contextlib.asynccontextmanager
async def worker(
    nats_url: str, base_url: str, slots: int, cores: set[int] | None
) -> AsyncIterator[asyncio.subprocess.Process]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "chainyard.toml"
        cfg.write_text(
            f'[[deployments]]\nname = "d"\npool = "{POOL}"\nmodel = "gpt-4o-mini"\n'
            f'[[pools]]\nname = "{POOL}"\nprovider = "openai"\nbase_url = "{base_url}/v1"\n'
            f"slots = {slots}\ntimeout_s = 120\n"
        )
        log = (Path(tmp) / "worker.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainyard.cli", "worker", "--nats", nats_url,
            "--config", str(cfg), "--pool", POOL, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        try:
            _pin(proc.pid, cores)
            yield proc
        finally:
            await _stop(proc)
            if proc.returncode not in (0, None):
                tail = (Path(tmp) / "worker.log").read_text()[-2000:]
                print(f"worker exited {proc.returncode}:\n{tail}", file=sys.stderr)


def assignments(n: int, tag: str) -> list[bytes]:
    now = time.time_ns() // 1_000_000
    target = Target(deployment="d", pool=POOL, provider="openai", model="gpt-4o-mini")
    msgs = [Message(role="user", content="Say hello to the benchmark.")]
    return [
        encode(
            Assignment(
                chain_id=f"{tag}{i:07d}", step_id="s", attempt=1, tenant=TENANT,
                step=LlmStep(id="s", model="gpt-4o-mini", messages=msgs),
                target=target, dispatched_at_ms=now,
            )
        )
        for i in range(n)
    ]  # fmt: skip


async def preload(bus: Bus, payloads: list[bytes], tag: str) -> None:
    subject = bus.subjects.work(POOL)
    for start in range(0, len(payloads), 1000):
        await asyncio.gather(
            *(
                bus.js.publish(subject, p, headers={"Nats-Msg-Id": f"{tag}{start + i}"})
                for i, p in enumerate(payloads[start : start + 1000])
            )
        )


class _Latency(msgspec.Struct):
    latency_ms: float = 0.0


_latency = msgspec.json.Decoder(_Latency)


class Completions:
    """Counts step events on a core subscription; `done` is set at `n`."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.failed = 0
        self.first = self.last = 0.0
        self.done = asyncio.Event()
        self.latencies: list[float] = []

    async def on(self, msg: Any) -> None:
        """A subscription callback that does no more than count: the driver takes as little of
        the shared cores as it can, since the bare loop it is compared with has no driver."""
        now = time.perf_counter()
        if msg.subject.endswith("step.failed"):
            self.failed += 1
        else:
            self.latencies.append(_latency.decode(msg.data).latency_ms)
        self.count += 1
        if self.count == 1:
            self.first = now
        self.last = now
        if self.count >= self.n:
            self.done.set()

    @property
    def per_s(self) -> float:
        return (self.count - 1) / (self.last - self.first) if self.last > self.first else 0.0


async def run_worker(
    nats_url: str,
    base_url: str,
    n: int,
    slots: int,
    cores: set[int] | None,
    tag: str,
    others: dict[str, int | None],
) -> dict[str, Any]:
    """Preload n steps, start a worker process, wait for n events; sample RSS and ack-pending."""
    bus = await open_bus(nats_url, name="bench-driver")
    c = Completions(n)
    sub = await bus.nc.subscribe(f"cy.events.{TENANT}.*.step.*", cb=c.on)
    peak = {"rss_mb": 0.0, "inflight": 0, "rss_at_peak_inflight": 0.0}
    try:
        await preload(bus, assignments(n, tag), tag)
        async with worker(nats_url, base_url, slots, cores) as proc:
            idle = 0.0
            while not idle:  # the worker's first heartbeat: it is up, not yet fetching much
                with contextlib.suppress(Exception):
                    if await bus.capacity.keys():
                        idle = rss_mb(proc.pid)
                await asyncio.sleep(0.05)
            cpu0 = cpu_s(proc.pid)
            others0 = {k: cpu_s(pid) for k, pid in others.items() if pid}
            topo = bus.topology
            while not c.done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(c.done.wait(), 0.25)
                info = await bus.js.consumer_info(topo.work.name, topo.pool_consumer(POOL).durable)
                rss = rss_mb(proc.pid)
                peak["rss_mb"] = max(peak["rss_mb"], rss)
                if info.num_ack_pending >= peak["inflight"]:
                    peak["inflight"] = info.num_ack_pending
                    peak["rss_at_peak_inflight"] = rss
                if proc.returncode is not None:
                    raise RuntimeError(f"worker exited {proc.returncode}")
            worker_cpu = cpu_s(proc.pid) - cpu0
            other_cpu = {k: cpu_s(others[k] or 0) - v for k, v in others0.items()}
            hwm = rss_mb(proc.pid, "VmHWM")
    finally:
        await sub.unsubscribe()
        await bus.close()
    return {
        "steps_per_s": c.per_s,
        "failed": c.failed,
        "call_latency_p50_ms": round(statistics.median(c.latencies), 1) if c.latencies else None,
        "call_latency_max_ms": round(max(c.latencies), 1) if c.latencies else None,
        "idle_rss_mb": idle,
        "peak_rss_mb": max(peak["rss_mb"], hwm),
        "peak_inflight": peak["inflight"],
        "rss_at_peak_inflight_mb": peak["rss_at_peak_inflight"],
        "worker_cpu_pct": round(100 * worker_cpu / max(c.last - c.first, 1e-9), 1),
        # CPU per step: steadier than steps/s on a shared, noisy machine
        "worker_cpu_us_per_step": round(1e6 * worker_cpu / max(c.count, 1), 1),
        **{
            f"{k}_cpu_pct": round(100 * v / max(c.last - c.first, 1e-9), 1)
            for k, v in other_cpu.items()
        },
        "loadavg_1m_after": os.getloadavg()[0],
    }


async def _has_heartbeat(bus: Bus) -> bool:
    with contextlib.suppress(Exception):
        return bool(await bus.capacity.keys())
    return False


async def _worker_vs_bare(
    n: int, cores: tuple[set[int], set[int]] | None, load: bool, rounds: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Bare client loops, then one worker with 256 slots, against one zero-latency sandbox;
    `rounds` times, alternating. The bare rates are each kind's median; the worker's figures
    are those of its median round, with every round's rate beside them."""
    bares: dict[str, list[float]] = {}
    runs: list[dict[str, Any]] = []
    async with (
        NatsServer() as nats,
        sandbox(0.0, cores[1] if cores else None, load=load) as (url, spid),
    ):
        others = {"sandbox": spid, "nats_server": nats.pid}
        core = cores[0] if cores else None
        own = os.sched_getaffinity(0) if cores else None
        for r in range(rounds):
            try:
                _pin(0, core)
                bare = await measure_clients(
                    n, (256,), ("aiohttp_bare", "provider_client"), base_url=url + "/v1"
                )
            finally:
                _pin(0, own)
            for k, v in bare["rps"].items():
                bares.setdefault(k, []).append(v[256])
            runs.append(await run_worker(nats.url, url, n, 256, core, f"h{r}-", others))
    runs.sort(key=lambda w: w["steps_per_s"])
    w = {**runs[len(runs) // 2], "rounds_steps_per_s": [round(x["steps_per_s"]) for x in runs]}
    return {k: round(statistics.median(v), 1) for k, v in bares.items()}, w


@benchmark("workers", ("worker_http_vs_bare_client_c256",))
async def worker_http(ctx: Ctx) -> list[Figure]:
    """Worker steps/s (256 slots, zero-latency sandbox, through NATS) vs the fastest bare client.

    Against the full OpenAI sandbox (the figure), and again against the load sandbox, which
    is ~10x cheaper a request, so that the worker's own cost shows (in the conditions)."""
    n = ctx.n("worker_n", 20_000, 3_000)
    rounds = ctx.n("rounds", 3, 1)
    cores = _cores() if ctx.n("pin", 1, 1) else None
    bare, w = await _worker_vs_bare(n, cores, load=False, rounds=rounds)
    best = max(bare, key=lambda k: bare[k])
    load_bare, load_w = await _worker_vs_bare(n, cores, load=True, rounds=1)
    load_best = max(load_bare.values())
    steps = load_w.pop("steps_per_s")
    against_load = {"worker_steps_per_s": round(steps, 1), "bare_rps": load_bare,
                    "ratio": round(steps / load_best, 3), **load_w}  # fmt: skip
    return [
        Figure(
            "worker_http_vs_bare_client_c256", w["steps_per_s"], "steps/s",
            f"bare_{best}_c256", bare[best],
            {"n": n, "rounds": rounds, "figure": "median round vs median bare rate",
             "slots": 256, "goal_ratio": 0.8, "pinned": cores is not None,
             "bare_rps": bare, "sandbox": "chainyard.sandbox openai, separate process, 0 ms",
             **{k: v for k, v in w.items() if k != "steps_per_s"},
             "against_load_sandbox": against_load},
        )
    ]  # fmt: skip


@benchmark("inflight", ("inflight_10k_rss_mb", "inflight_10k_steps_per_s"))
async def inflight(ctx: Ctx) -> list[Figure]:
    """One worker process with 10,000 slots: throughput at 1 s provider latency, RSS at 10k held
    (goal: <= 1 GB).

    Pass 1 (provider 1 s): steps/s vs what the calls in flight would allow (in-flight / 1 s).
    Pass 2 (provider `hold_ms`, long enough for the worker to fill every slot): peak RSS with
    the most calls in flight, vs the same worker idle.
    """
    slots = ctx.n("slots", 10_000, 1_000)
    n = ctx.n("inflight_n", 4 * slots, 3 * slots)
    hold_ms = float(ctx.n("hold_ms", 30_000, 5_000))
    cores = _cores() if ctx.n("pin", 1, 1) else None
    passes = []
    for latency_ms, count, tag in ((1000.0, n, "i"), (hold_ms, slots, "m")):
        async with (
            NatsServer() as nats,
            sandbox(latency_ms, cores[1] if cores else None, load=True) as (url, spid),
        ):
            others = {"sandbox": spid, "nats_server": nats.pid}
            w = await run_worker(
                nats.url, url, count, slots, cores[0] if cores else None, tag, others
            )
        passes.append({"n": count, "provider_latency_ms": latency_ms, **w})
    fast, held = passes
    cond = {"slots": slots, "pinned": cores is not None, "goal_rss_mb": 1024,
            "goal_steps_per_s": slots, "throughput_pass": fast, "rss_pass": held}  # fmt: skip
    return [
        Figure("inflight_10k_rss_mb", held["peak_rss_mb"], "MB", "idle_worker_rss_mb",
               held["idle_rss_mb"], cond),
        Figure("inflight_10k_steps_per_s", fast["steps_per_s"], "steps/s",
               "peak_inflight_over_latency", fast["peak_inflight"] * 1000 / 1000.0, cond),
    ]  # fmt: skip
