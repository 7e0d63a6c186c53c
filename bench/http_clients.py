"""HTTP client throughput: httpx (default, tuned, aiohttp transport), new_client, the lean pool
(`post_bytes`, the worker's hot path), bare aiohttp.

Against the load sandbox (chainyard.sandbox.load: zero latency, ~20 us a request, so the server
is not what is measured) in its own process; every request POSTs a small chat completion request
and decodes the JSON answer.

    python -m bench.http_clients [--requests 3000] [--concurrency 1 64 256] [--json]

`await measure(...)` returns the same numbers as a dict, for `make bench`. On a machine with
2+ cores the server and the client are pinned to different cores, so neither starves the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

CLIENTS = ("httpx_default", "httpx_tuned", "httpx_aiohttp", "new_client", "lean", "aiohttp_bare")
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
async def server() -> AsyncIterator[tuple[str, int]]:
    """Start the load sandbox in a child process, pinned to the second core; (base_url, pid)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainyard.sandbox.load",
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
    if kind == "lean":
        from chainyard.workers.providers._http import new_client, post_bytes

        body = json.dumps(BODY).encode()
        async with new_client(base_url, {"content-type": "application/json"}) as lean:

            async def post_lean() -> None:
                status, _, data = await post_bytes(lean, "/chat/completions", body)
                if status != 200:
                    raise httpx.HTTPError(f"the sandbox answered {status}")
                assert json.loads(data)["choices"]

            yield post_lean
        return

    if kind == "httpx_default":
        client = httpx.AsyncClient()
    elif kind == "httpx_tuned":
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=max(concurrency, 20))
        client = httpx.AsyncClient(limits=limits)
    elif kind == "httpx_aiohttp":
        from httpx_aiohttp import HttpxAiohttpClient

        client = HttpxAiohttpClient(limits=httpx.Limits(max_connections=max(concurrency, 100)))
    elif kind == "new_client":
        from chainyard.workers.providers._http import new_client

        client = new_client(base_url)
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
            except (httpx.HTTPError, aiohttp.ClientError, TimeoutError):
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
    (lean / default httpx at c=64, if both ran), and `conditions`.
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
    for kind in clients:
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
            rps["lean"][64] / rps["httpx_default"][64], 3
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


@benchmark("http_clients", ("http_client_vs_httpx_default_c64",))
async def http_client_vs_httpx_default_c64(ctx: Ctx) -> list[Figure]:
    """The worker's HTTP hot path (workers/providers/_http.py: post_bytes, the lean pool) vs
    httpx's default client, c=64; the httpx API over the chosen transport (new_client) and bare
    aiohttp ride along in the conditions."""
    n = ctx.n("requests", 3000, 600)
    kinds = ("httpx_default", "new_client", "aiohttp_bare", "lean")
    r = await measure(requests=n, concurrencies=(64,), clients=kinds)
    conditions = {**r["conditions"], "requests": n, "concurrency": 64, "rows": r["rows"]}
    return [
        Figure(
            "http_client_vs_httpx_default_c64",
            r["rps"]["lean"][64],
            "req/s",
            "httpx_default_rps_c64",
            r["rps"]["httpx_default"][64],
            conditions,
        )
    ]


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
    args = ap.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        uvloop = None  # type: ignore[assignment]
    run = uvloop.run if uvloop is not None else asyncio.run
    result = run(measure(args.requests, args.concurrency, args.clients))
    print(json.dumps(result, indent=2) if args.json else _table(result))


if __name__ == "__main__":
    main()
