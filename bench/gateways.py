"""Figures peer_*: what chainyard adds to a provider call, beside a peer gateway (Portkey).

One provider stand-in (the load sandbox, chainyard.sandbox.load, answering after a fixed 20 ms)
is called three ways, at 1 and at 32 requests in flight:
- directly, with the worker's own HTTP client (bench.added_latency's `_direct`);
- through the Portkey AI gateway (npm `@portkey-ai/gateway`, pinned in bench/peers/package.json
  and installed there with `npm ci`), started headless on a free port, the same client sending
  `x-portkey-provider: openai` and `x-portkey-custom-host` = the stand-in;
- as a one-step chain submitted on NATS through chainyard (bench.added_latency's `Driver`:
  nats-server, `chainyard router` and `chainyard worker` as their own processes).
Rounds alternate the three. Added latency = the path's percentile minus the direct call's over
the same rounds; CPU per request = the gateway's process CPU (Portkey: its node process;
chainyard: router + worker; nats-server beside it in the conditions) over the requests served.

Each figure is chainyard's value against Portkey's in the same run (ratio < 1: chainyard adds
less). Without node, npm or the package, the Portkey rows are skipped with the reason printed
and the figures are against the direct call instead; never a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from chainyard.runtime.nats import open_bus
from chainyard.runtime.server import NatsServer

from .added_latency import POOL, Driver, _config, _direct, idle_wake, service
from .calibrate import load_average
from .core import HERE, Ctx, Figure, benchmark
from .drive import percentile
from .workers import cpu_s, sandbox

PEERS = HERE / "peers"  # package.json + package-lock.json; node_modules is not committed
PORTKEY_JS = PEERS / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
LATENCY_MS = 20.0
WINDOWS = (1, 32)


def _pinned_version() -> str:
    return json.loads((PEERS / "package.json").read_text())["dependencies"]["@portkey-ai/gateway"]


async def portkey_script() -> tuple[str | None, str]:
    """(node, start script) once installed, or (None, why not). Installs with `npm ci` the first
    time; a missing node or npm, or a failed install, is a reason to skip, not an error."""
    node = shutil.which("node")
    if node is None:
        return None, "node not found on PATH"
    if not PORTKEY_JS.exists():
        npm = shutil.which("npm")
        if npm is None:
            return None, "npm not found on PATH"
        # --ignore-scripts: its only install script is patch-package, with no patches shipped
        proc = await asyncio.create_subprocess_exec(
            npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", cwd=PEERS,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 300)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None, "npm ci in bench/peers took over 300 s"
        if proc.returncode != 0 or not PORTKEY_JS.exists():
            tail = out.decode(errors="replace").strip().splitlines()[-3:]
            return None, f"npm ci in bench/peers failed ({proc.returncode}): {' | '.join(tail)}"
    return node, str(PORTKEY_JS)


async def portkey_or_skip(ctx: Ctx, bench: str) -> tuple[str | None, str, str | None]:
    """portkey_script()'s (node, script), and why `bench` skips its Portkey rows (printed, and
    noted in `ctx`), None when Portkey can run."""
    node, script = await portkey_script()
    skipped = None if node else script
    if skipped:
        print(f"   Portkey rows skipped: {skipped}", flush=True)
        ctx.notes.append(f"{bench}: Portkey rows skipped: {skipped}")
    return node, script, skipped


def free_port() -> int:
    # Portkey takes a port number only; the moment between close and its bind is the risk taken
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def portkey(node: str, script: str) -> AsyncIterator[tuple[str, int]]:
    """The Portkey gateway as its own node process: (base URL without /v1, pid)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        node, script, f"--port={port}", "--headless",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    ready = asyncio.Event()
    seen: list[bytes] = []

    async def drain() -> None:  # read all it prints, so that a full pipe never stalls it
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            seen.append(chunk)
            if b"Ready for connections" in b"".join(seen[-2:]):
                ready.set()

    reader = asyncio.create_task(drain())
    try:
        try:
            await asyncio.wait_for(ready.wait(), 30)
        except TimeoutError:
            out = b"".join(seen).decode(errors="replace")[-500:]
            raise RuntimeError(f"Portkey not ready in 30 s: {out}") from None
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        if proc.returncode is None:
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def portkey_path(
    stack: contextlib.AsyncExitStack, node: str, script: str, stand_in: str
) -> tuple[_Path, str]:
    """Portkey started on `stack`, as a path to the stand-in (its OpenAI custom host), and its
    base URL."""
    base, pid = await stack.enter_async_context(portkey(node, script))
    headers = {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"{stand_in}/v1",
        "Authorization": "Bearer sk-bench",
    }
    path = _Path("portkey", lambda _p, n, w: _direct(base, n, headers, w))
    path.pids = {"portkey": pid}
    return path, base


def added_rows(
    paths: list[_Path], gateway: dict[str, tuple[str, ...]], window: int
) -> dict[str, dict[str, Any]]:
    """Each path's summary at `window` in flight, with what it adds over the direct call."""
    rows = {p.name: p.summary(window, gateway[p.name]) for p in paths}
    base = rows["direct"]
    for name, row in rows.items():
        if name != "direct":
            row["added_p50_ms"] = round(row["p50_ms"] - base["p50_ms"], 3)
            row["added_p99_ms"] = round(row["p99_ms"] - base["p99_ms"], 3)
    return rows


async def _chains(d: Driver, prefix: str, n: int, window: int) -> list[float]:
    """n one-step chains, `window` in flight (as `_direct` does its calls): latencies in ms."""
    out: list[float] = []

    async def chains(lane: int, count: int) -> None:
        for i in range(count):
            out.append(await d.run(f"{prefix}{lane}-{i}"))

    await asyncio.gather(*(chains(w, n // window + (w < n % window)) for w in range(window)))
    return out


class _Path:
    """One way to the stand-in: latencies over every round, and the CPU of its processes."""

    def __init__(self, name: str, call: Callable[[str, int, int], Awaitable[list[float]]]) -> None:
        self.name = name
        self.call = call  # (key prefix, n, window) -> latencies in ms
        self.pids: dict[str, int] = {}
        self.lat: dict[int, list[float]] = {}
        self.cpu_s: dict[int, dict[str, float]] = {}
        self.wall_s: dict[int, float] = {}

    async def measure(self, prefix: str, n: int, window: int) -> None:
        cpu0 = {k: cpu_s(pid) for k, pid in self.pids.items()}
        t0 = time.perf_counter()
        lat = await self.call(prefix, n, window)
        self.wall_s[window] = self.wall_s.get(window, 0.0) + time.perf_counter() - t0
        self.lat.setdefault(window, []).extend(lat)
        cpu = self.cpu_s.setdefault(window, {})
        for k, pid in self.pids.items():
            cpu[k] = cpu.get(k, 0.0) + cpu_s(pid) - cpu0[k]

    def summary(self, window: int, gateway: tuple[str, ...]) -> dict[str, Any]:
        lat = self.lat[window]
        cpu = self.cpu_s.get(window, {})
        return {
            "n": len(lat),
            "p50_ms": round(percentile(lat, 50), 3),
            "p99_ms": round(percentile(lat, 99), 3),
            "requests_per_s": round(len(lat) / self.wall_s[window], 1),
            "cpu_us_per_request": {k: round(v / len(lat) * 1e6, 1) for k, v in cpu.items()},
            "gateway_cpu_us_per_request": round(sum(cpu[k] for k in gateway) / len(lat) * 1e6, 1),
        }


@benchmark(
    "peer_portkey",
    tuple(
        f"peer_{what}_{w}"
        for w in ("c1", "c32")
        for what in ("added_p50_ms", "added_p99_ms", "cpu_us_per_request")
    ),
)
async def peer_portkey(ctx: Ctx) -> list[Figure]:
    """A one-step chain through chainyard vs the Portkey gateway, over a direct 20 ms call."""
    sizes = {1: ctx.n("n_c1", 400, 40), 32: ctx.n("n_c32", 4000, 320)}
    rounds = max(1, ctx.n("rounds", 3, 1))
    load_before = load_average()
    node, script, skipped = await portkey_or_skip(ctx, "peer_portkey")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        async with (
            NatsServer() as nats,
            sandbox(LATENCY_MS, None, load=True) as (url, sandbox_pid),
            contextlib.AsyncExitStack() as stack,
        ):
            cfg = tmp / "chainyard.toml"
            cfg.write_text(_config(url))
            common = ["--nats", nats.url, "--config", str(cfg)]
            bus = await open_bus(nats.url, name="bench-peer-portkey")
            stack.push_async_callback(bus.close)
            router = await stack.enter_async_context(service(["router", *common], tmp, "router"))
            worker = await stack.enter_async_context(
                service(["worker", *common, "--pool", POOL], tmp, "worker")
            )
            d = Driver(bus)
            await d.start()
            direct = _Path("direct", lambda _p, n, w: _direct(url, n, window=w))
            chainyard = _Path("chainyard", lambda p, n, w: _chains(d, p, n, w))
            direct.pids = {"driver": os.getpid()}  # the bare client's own CPU: a yardstick
            chainyard.pids = {"router": router.pid, "worker": worker.pid}
            if nats.pid:
                chainyard.pids["nats_server"] = nats.pid
            paths = [direct, chainyard]
            if node:
                pk, _ = await portkey_path(stack, node, script, url)
                paths.insert(1, pk)
            for p in paths:  # the stand-in's CPU in every row, to show it is the same
                p.pids["sandbox"] = sandbox_pid
            for p in paths:  # warm: connections open, the router and worker up, node's JIT
                await p.call(f"warm-{p.name}-", ctx.n("warm", 600, 64), 32)
            for r in range(rounds):
                for w in WINDOWS:
                    order = paths if r % 2 == 0 else paths[::-1]
                    for p in order:
                        await p.measure(f"r{r}-c{w}-", sizes[w], w)
    gateway = {"direct": ("driver",), "portkey": ("portkey",), "chainyard": ("router", "worker")}
    by_window = {w: added_rows(paths, gateway, w) for w in WINDOWS}
    wake = await idle_wake(LATENCY_MS, ctx.n("wake_n", 200, 40))
    cond: dict[str, Any] = {
        "provider": f"chainyard.sandbox.load, fixed {LATENCY_MS:g} ms, its own process",
        "client": "the worker's HTTP client (bench.added_latency._direct) for direct and Portkey;"
        " chainyard: intake publish on NATS, the step's stored answer (`step.completed`, what"
        " `Client.answer` returns) seen on a core subscription",
        "portkey": f"@portkey-ai/gateway {_pinned_version()} on node, --headless, free port,"
        " x-portkey-provider: openai, x-portkey-custom-host: the stand-in"
        if node
        else f"skipped: {skipped}",
        "chainyard": "nats-server, `chainyard router`, `chainyard worker` (256 slots), each its own"
        " process",
        "gateway_cpu": "Portkey: its node process; chainyard: router + worker (nats-server apart);"
        " direct: this driver's own HTTP client, a yardstick",
        "rounds": rounds,
        "order": "rounds alternate direct, Portkey, chainyard and the reverse; each window in turn",
        "results": {f"c{w}": rows for w, rows in by_window.items()},
        "idle_wake": wake,
        "load_before": load_before,
        "load_after": load_average(),
        "goal": "chainyard adds less than Portkey at p50 and p99, at 1 and 32 in flight",
    }
    figures = []
    for w in WINDOWS:
        rows = by_window[w]
        cy = rows["chainyard"]
        peer = rows.get("portkey")
        for pct in ("p50", "p99"):
            if peer:
                base_name, base = f"portkey_added_{pct}_ms_c{w}", peer[f"added_{pct}_ms"]
            else:
                base_name, base = f"direct_{pct}_ms_c{w}", rows["direct"][f"{pct}_ms"]
            figures.append(
                Figure(
                    f"peer_added_{pct}_ms_c{w}", cy[f"added_{pct}_ms"], "ms", base_name, base, cond
                )
            )
        if peer:
            base_name, base = f"portkey_cpu_us_per_request_c{w}", peer["gateway_cpu_us_per_request"]
        else:
            base_name = f"direct_client_cpu_us_per_request_c{w}"
            base = rows["direct"]["gateway_cpu_us_per_request"]
        figures.append(
            Figure(
                f"peer_cpu_us_per_request_c{w}", cy["gateway_cpu_us_per_request"], "us",
                base_name, base, cond,
            )
        )  # fmt: skip
    if any(f.value >= f.baseline_value for f in figures if f.baseline_name.startswith("portkey")):
        print("   chainyard adds more than Portkey in at least one row", file=sys.stderr)
    return figures
