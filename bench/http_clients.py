"""HTTP client cost: the provider client (workers/providers/_http.py) beside the alternatives.

Two conditions, the server always the load sandbox (chainyard.sandbox.load, ~20 us a request) in
its own process, every request a small chat completion POST whose JSON answer is decoded:
- throughput against a zero-latency server at a fixed concurrency (`measure`): what a client
  can do flat out;
- what a worker meets (`measure_realistic`, `--realistic`): calls started at a steady rate (1,000
  a second) to a provider that answers after 200 ms, each its own task, then thousands started at
  once: this process's CPU per call, and whether the client keeps the pace.

    python -m bench.http_clients [--requests 3000] [--concurrency 1 64 256] [--json]
    python -m bench.http_clients --realistic [--rate 1000] [--latency-ms 200] [--inflight 5000]

Clients not installed (httpx2, httpx_aiohttp, pyreqwest, niquests: `pip install` them to compare)
are skipped. On a machine with 2+ cores the server and the client are pinned to different cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import httpx

from bench.core import Ctx, Figure, benchmark
from chainyard.workers.providers._http import HttpError

CLIENTS = (
    "provider_client", "aiohttp_bare", "httpx_default", "httpx_tuned", "httpx2", "httpx_aiohttp",
    "pyreqwest", "niquests",
)  # fmt: skip
OPTIONAL = {"httpx2": "httpx2", "httpx_aiohttp": "httpx_aiohttp", "pyreqwest": "pyreqwest",
            "niquests": "niquests"}  # fmt: skip
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 16,
}
Post = Callable[[], Awaitable[None]]
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project


# ---------------------------------------------------------------- the server (its own process)


def _pinnable() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2


def _pin(cpu: int, pid: int = 0) -> None:
    """Pin process `pid` (this one by default) to one core, where there are two or more."""
    if _pinnable():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {cpu})


@contextlib.asynccontextmanager
async def server(latency_ms: float = 0.0) -> AsyncIterator[tuple[str, int]]:
    """Start the load sandbox in a child process, pinned to the second core; (base_url, pid)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.sandbox.load", "--latency-ms", str(latency_ms),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=_ROOT,
    )  # fmt: skip
    try:
        _pin(1, proc.pid)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not line.strip():
            raise RuntimeError("bench server did not start")
        yield f"http://127.0.0.1:{int(line)}/v1", proc.pid
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc), 0.0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# ---------------------------------------------------------------- the clients


def installed(kinds: Sequence[str]) -> list[str]:
    """The kinds whose library is importable here (the optional ones are not dependencies)."""
    return [k for k in kinds if k not in OPTIONAL or importlib.util.find_spec(OPTIONAL[k])]


@contextlib.asynccontextmanager
async def _client(kind: str, base_url: str, concurrency: int) -> AsyncIterator[Post]:
    url = base_url + "/chat/completions"
    if kind == "aiohttp_bare":
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def post_bare() -> None:
                async with session.post(url, json=BODY) as r:
                    r.raise_for_status()
                    data = await r.json()
                assert data["choices"]

            yield post_bare
        return
    if kind == "provider_client":
        from chainyard.workers.providers._http import HttpClient

        body = json.dumps(BODY).encode()
        pc = HttpClient(base_url, {"content-type": "application/json"})

        async def post_provider() -> None:
            status, _, data = await pc.post("/chat/completions", body)
            if status != 200:
                raise httpx.HTTPError(f"the sandbox answered {status}")
            assert json.loads(data)["choices"]

        try:
            yield post_provider
        finally:
            await pc.aclose()
        return
    if kind == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        body = json.dumps(BODY).encode()
        builder = ClientBuilder().max_connections(None).pool_max_idle_per_host(1 << 16)
        async with builder.error_for_status(True).build() as rq:

            async def post_rq() -> None:
                req = rq.post(url).header("content-type", "application/json").body_bytes(body)
                r = await req.build().send()
                assert json.loads(bytes(await r.bytes()))["choices"]

            yield post_rq
        return
    if kind == "niquests":
        import niquests

        size = max(concurrency, 10)
        async with niquests.AsyncSession(pool_connections=1, pool_maxsize=size) as s:

            async def post_nq() -> None:
                r = await s.post(url, json=BODY)
                r.raise_for_status()
                assert r.json()["choices"]

            yield post_nq
        return

    if kind == "httpx2":
        import httpx2

        keep = max(concurrency, 20)
        limits2 = httpx2.Limits(max_connections=None, max_keepalive_connections=keep)
        client2 = httpx2.AsyncClient(limits=limits2, timeout=120)
        async with client2:

            async def post_httpx2() -> None:
                r = await client2.post(url, json=BODY)
                r.raise_for_status()
                assert r.json()["choices"]

            yield post_httpx2
        return

    if kind == "httpx_default":
        client = httpx.AsyncClient()
    elif kind == "httpx_tuned":
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(concurrency, 20))
        client = httpx.AsyncClient(limits=limits, timeout=120)
    elif kind == "httpx_aiohttp":
        from httpx_aiohttp import HttpxAiohttpClient

        client = HttpxAiohttpClient(limits=httpx.Limits(max_connections=max(concurrency, 100)))
    else:
        raise ValueError(f"unknown client {kind!r}; known: {', '.join(CLIENTS)}")

    async with client:

        async def post_httpx() -> None:
            r = await client.post(url, json=BODY)
            r.raise_for_status()
            assert r.json()["choices"]

        yield post_httpx


async def _run(post: Post, requests: int, concurrency: int) -> tuple[float, int]:
    """(seconds, failed calls) for `requests` calls made by `concurrency` tasks."""
    left, errors = requests, 0

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                await post()
            except (httpx.HTTPError, aiohttp.ClientError, HttpError, TimeoutError):
                errors += 1  # e.g. httpx's default 5 s pool timeout at high concurrency

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(min(concurrency, requests)):
            tg.create_task(worker())
    return time.perf_counter() - t0, errors


async def measure(
    requests: int = 3000,
    concurrencies: Sequence[int] = (1, 64, 256),
    clients: Sequence[str] = CLIENTS,
    base_url: str | None = None,
) -> dict[str, Any]:
    """Requests/s of each client at each concurrency; starts its own server unless given one.

    Keys: `rows` (client, concurrency, requests, seconds, errors, rps of the calls that succeeded,
    server_cpu_pct), `rps` ({client: {concurrency: rps}}), `http_client_vs_httpx_default_c64`
    (the provider client / default httpx at c=64, if both ran), and `conditions`.
    """
    if base_url is None:
        affinity = os.sched_getaffinity(0) if _pinnable() else None
        try:
            async with server() as (url, pid):
                _pin(0)
                return await _measure(requests, concurrencies, clients, url, pid)
        finally:
            if affinity is not None:
                os.sched_setaffinity(0, affinity)
    return await _measure(requests, concurrencies, clients, base_url, None)


async def _measure(
    requests: int, concurrencies: Sequence[int], clients: Sequence[str], url: str, pid: int | None
) -> dict[str, Any]:
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    rps: dict[str, dict[int, float]] = {}
    for kind in installed(clients):
        for c in concurrencies:
            async with _client(kind, url, c) as post:
                await _run(post, min(requests, max(2 * c, 50)), c)  # warm-up: open connections
                cpu0 = _cpu_seconds(pid) if pid else 0.0
                seconds, errors = await _run(post, requests, c)
                cpu = (_cpu_seconds(pid) - cpu0) if pid else 0.0
            rate = (requests - errors) / seconds
            rps.setdefault(kind, {})[c] = rate
            rows.append(
                {
                    "client": kind,
                    "concurrency": c,
                    "requests": requests,
                    "seconds": round(seconds, 3),
                    "errors": errors,
                    "rps": round(rate, 1),
                    "server_cpu_pct": round(100 * cpu / seconds, 1) if pid else None,
                }
            )
    result: dict[str, Any] = {"rows": rows, "rps": rps}
    with contextlib.suppress(KeyError):
        result["http_client_vs_httpx_default_c64"] = round(
            rps["provider_client"][64] / rps["httpx_default"][64], 3
        )
    loop = type(asyncio.get_running_loop())
    result["conditions"] = {
        "loop": f"{loop.__module__}.{loop.__name__}",
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "aiohttp": aiohttp.__version__,
        "cpus": os.cpu_count(),
        "pinned": pid is not None and _pinnable(),
        "server": "chainyard.sandbox.load, separate process, zero latency",
        "loadavg_1m_before": load_before,
    }
    return result


def _rss_mb() -> float:
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def paced(post: Post, rate: float, seconds: float) -> dict[str, Any]:
    """Start `rate` calls a second for `seconds`, each its own task, as a worker's slots do;
    this process's CPU per call (user+system, the server is another process) and the peak
    RSS growth while they ran."""
    tasks: set[asyncio.Task[None]] = set()
    errors = 0

    async def one() -> None:
        nonlocal errors
        try:
            await post()
        except Exception:
            errors += 1

    rss0, peak = _rss_mb(), 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    started = sampled = 0
    while (now := time.perf_counter() - t0) < seconds:
        due = int(now * rate) - started
        for _ in range(due):
            t = asyncio.create_task(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        started += max(due, 0)
        if now * 10 > sampled:  # RSS ten times a second: reading it costs CPU too
            sampled += 1
            peak = max(peak, _rss_mb())
        await asyncio.sleep(0.002)
    while tasks:
        peak = max(peak, _rss_mb())
        await asyncio.wait(set(tasks), timeout=0.05)
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - t0
    return {
        "calls": started, "errors": errors, "cpu_us_per_call": round(1e6 * cpu / started, 1),
        "cpu_pct": round(100 * cpu / wall, 1), "rss_growth_mb": round(peak - rss0, 1),
        "kept_pace": wall < seconds + 2.0,  # the last call ended within 2 s of the last start
    }  # fmt: skip


async def burst(post: Post, n: int) -> dict[str, Any]:
    """`n` calls started at once (all in flight together): seconds, CPU per call, RSS growth."""
    rss0, peak = _rss_mb(), 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(post()) for _ in range(n)]
    pending = set(tasks)
    while pending:
        peak = max(peak, _rss_mb())
        _, pending = await asyncio.wait(pending, timeout=0.05)
    errors = sum(1 for t in tasks if t.exception() is not None)
    cpu = time.process_time() - cpu0
    return {
        "calls": n, "errors": errors, "seconds": round(time.perf_counter() - t0, 2),
        "cpu_us_per_call": round(1e6 * cpu / n, 1), "rss_growth_mb": round(peak - rss0, 1),
    }  # fmt: skip


async def measure_realistic(
    clients: Sequence[str] = CLIENTS, latency_ms: float = 200.0, rate: float = 1000.0,
    seconds: float = 10.0, inflight: int = 5000,
) -> dict[str, Any]:  # fmt: skip
    """Each client under what a worker meets: `rate` calls/s to a provider answering after
    `latency_ms`, then `inflight` calls at once; in one process, clients one after another."""
    out: dict[str, Any] = {}
    async with server(latency_ms) as (url, _):
        _pin(0)
        for kind in installed(clients):
            async with _client(kind, url, inflight) as post:
                await paced(post, rate, 1.0)  # warm-up: the connections a steady rate needs
                row = {"paced": await paced(post, rate, seconds)}
                row["inflight"] = await burst(post, inflight)
            out[kind] = row
            print(kind, json.dumps(row), file=sys.stderr, flush=True)
    return {"latency_ms": latency_ms, "rate": rate, "inflight": inflight, "clients": out}


@benchmark("http_clients", ("http_client_vs_httpx_default_c64",))
async def http_client_vs_httpx_default_c64(ctx: Ctx) -> list[Figure]:
    """The provider client (workers/providers/_http.py) vs httpx's default client, c=64 against
    a zero-latency server; bare aiohttp rides along in the conditions."""
    n = ctx.n("requests", 3000, 600)
    kinds = ("httpx_default", "aiohttp_bare", "provider_client")
    r = await measure(requests=n, concurrencies=(64,), clients=kinds)
    conditions = {**r["conditions"], "requests": n, "concurrency": 64, "rows": r["rows"]}
    return [
        Figure(
            "http_client_vs_httpx_default_c64",
            r["rps"]["provider_client"][64],
            "req/s",
            "httpx_default_rps_c64",
            r["rps"]["httpx_default"][64],
            conditions,
        )
    ]


@benchmark("http_clients_realistic", ("http_client_cpu_us_per_call_1k_200ms",))
async def http_client_cpu_per_call(ctx: Ctx) -> list[Figure]:
    """CPU per call of the provider client at 1,000 calls/s to a provider answering after 200 ms
    (lower is better), beside bare aiohttp; the burst of calls in flight in the conditions."""
    seconds = float(ctx.n("seconds", 10, 3))
    r = await measure_realistic(
        ("provider_client", "aiohttp_bare"), seconds=seconds, inflight=ctx.n("burst", 5000, 1000)
    )
    ours, bare = r["clients"]["provider_client"], r["clients"]["aiohttp_bare"]
    return [
        Figure(
            "http_client_cpu_us_per_call_1k_200ms", ours["paced"]["cpu_us_per_call"], "us",
            "aiohttp_bare_cpu_us_per_call", bare["paced"]["cpu_us_per_call"], r,
        )
    ]  # fmt: skip


def _table(result: dict[str, Any]) -> str:
    rps: dict[str, dict[int, float]] = result["rps"]
    cs = sorted({c for row in rps.values() for c in row})
    base = rps.get("httpx_default", {})
    out = [f"{'client':<15}" + "".join(f"{f'c={c} rps':>12}{'x dflt':>8}" for c in cs)]
    for kind, row in rps.items():
        cells = ""
        for c in cs:
            r = row.get(c)
            ratio = f"{r / base[c]:.2f}" if r and base.get(c) else "-"
            cells += f"{r:>12.0f}{ratio:>8}" if r else f"{'-':>12}{'-':>8}"
        out.append(f"{kind:<15}{cells}")
    for row in result["rows"]:
        if row["errors"]:
            out.append(f"{row['client']} c={row['concurrency']}: {row['errors']} calls failed")
    for key in ("http_client_vs_httpx_default_c64",):
        if key in result:
            out.append(f"{key} = {result[key]}")
    out.append("conditions: " + json.dumps(result["conditions"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON")
    ap.add_argument(
        "--realistic",
        action="store_true",
        help="paced calls to a slow provider and a burst in flight (measure_realistic)",
    )
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--inflight", type=int, default=5000)
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    run = uvloop.run if uvloop is not None else asyncio.run
    if args.realistic:
        r = run(measure_realistic(args.clients, args.latency_ms, args.rate, inflight=args.inflight))
        print(json.dumps(r, indent=2))
        return
    result = run(measure(args.requests, args.concurrency, args.clients))
    print(json.dumps(result, indent=2) if args.json else _table(result))


if __name__ == "__main__":
    main()
