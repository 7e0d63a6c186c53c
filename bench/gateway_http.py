"""Figures gw_*: `chainyard gateway` over HTTP beside the Portkey gateway, and a dark provider.

One provider stand-in (the load sandbox, chainyard.sandbox.load, answering after a fixed 20 ms)
is called three ways with the same client (the worker's HTTP client, bench.added_latency's
`_direct`: `POST /v1/chat/completions`), at 1 and at 32 requests in flight:
- directly;
- through the Portkey AI gateway (bench.gateways' `portkey`: npm `@portkey-ai/gateway`, headless,
  `x-portkey-custom-host` = the stand-in);
- through `chainyard gateway` (its own process, with an API key from KV `cy_keys` carrying an
  rpm limit, so the key store and the shared limits are on the path), in front of nats-server,
  `chainyard router` and `chainyard worker`, each its own process: a one-step chain per request.
A fourth path, in the conditions only, submits the same one-step chain on NATS (no HTTP), to
split chainyard's added latency into the pool's part and the gateway's. Rounds alternate the
paths. Added latency = the path's percentile minus the direct call's;
requests per second = requests over the wall time of the path's rounds; CPU per request = the
gateway process's CPU over its requests (Portkey: its node process; chainyard: the gateway
process, and router + worker + gateway as a second number in the conditions).

Then the dark-provider comparison: the primary target accepts connections and never answers.
Portkey in fallback mode (targets: the dark one, then the stand-in; `request_timeout` =
DARK_TIMEOUT_S) tries the dark target on every request; chainyard routes a group (the dark
deployment cheaper, so preferred, then the stand-in) with the pool's `timeout_s` = the same
DARK_TIMEOUT_S, and once the dark deployment's breaker is open (seen on KV `cy_breakers`) sends
nothing there. p50 and failed requests side by side, at 1 in flight; the requests it took to
open the breaker, and their failures, are in the conditions.

A second benchmark, `limits_admit`, times `Limits.admit` for a key with an rpm limit: with its
leases (the default) against one compare-and-set per request (docs/DESIGN-NOTES.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from chainyard.gateway.keys import Grant, KeyStore, checked_grant, create_key, open_keys_kv
from chainyard.gateway.limits import LEASE_MAX, Limits
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer

from .added_latency import POOL, Driver, _direct, idle_wake, service
from .added_latency import _config as live_config
from .calibrate import load_average
from .core import Ctx, Figure, benchmark
from .drive import percentile
from .gateways import (
    LATENCY_MS,
    WINDOWS,
    _chains,
    _Path,
    _pinned_version,
    added_rows,
    free_port,
    portkey_or_skip,
    portkey_path,
)
from .workers import sandbox

TENANT = "bench"
GROUP = "fallback"
DARK_TIMEOUT_S = 0.5
BENCH_RPM = 1_000_000  # far above what is sent: the limit is checked, never reached


def _config(live_url: str, dark_url: str) -> str:
    """The stand-in as deployment `a` (bench.added_latency), and the group `fallback`: a dark
    deployment made cheaper (so the cheapest strategy prefers it), then the stand-in."""
    return f"""strategy = "cheapest"
{live_config(live_url)}
[[deployments]]
name = "primary"
pool = "dark"
model = "primary-model"
provider_model = "gpt-4o-mini"
price = {{ input_per_mtok = 0.1, output_per_mtok = 0.1 }}

[[deployments]]
name = "backup"
pool = "{POOL}"
model = "backup-model"
provider_model = "gpt-4o-mini"
price = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }}

[[pools]]
name = "dark"
provider = "openai"
base_url = "{dark_url}/v1"
slots = 64
timeout_s = {DARK_TIMEOUT_S}

[groups]
{GROUP} = ["primary", "backup"]
"""


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[str]:
    """A provider gone dark: it accepts connections and reads, and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for w in held:
            w.close()


@contextlib.asynccontextmanager
async def chainyard_gateway(common: list[str], tmp: Path) -> AsyncIterator[tuple[str, int]]:
    """`chainyard gateway` as its own process: (base URL without /v1, pid), once it listens."""
    port = free_port()
    args = ["gateway", *common, "--host", "127.0.0.1", "--port", str(port)]
    async with service(args, tmp, "gateway") as proc:
        log = tmp / "gateway.log"
        give_up = time.monotonic() + 60
        while "listening on" not in (log.read_text() if log.exists() else ""):
            if proc.returncode is not None or time.monotonic() > give_up:
                tail = log.read_text()[-1500:] if log.exists() else ""
                raise RuntimeError(f"chainyard gateway did not start: {tail}")
            await asyncio.sleep(0.05)  # its log is a file: nothing to wait on but its growth
        yield f"http://127.0.0.1:{port}", proc.pid


async def _bench_key(bus: Bus) -> str:
    kv = await open_keys_kv(bus.js)
    raw, _ = await create_key(kv, checked_grant(tenant=TENANT, rpm=BENCH_RPM), name="bench")
    return raw


async def _breaker_opens(bus: Bus, deployment: str) -> None:
    """Returns when the router has opened `deployment`'s breaker (a KV watch, no polling)."""
    watcher = await bus.breakers.watch(deployment)
    try:
        async for entry in watcher:
            if entry is not None and entry.value:
                if msgspec.json.decode(entry.value).get("status") == "open":
                    return
    finally:
        await watcher.stop()


async def _until_open(bus: Bus, url: str, headers: dict[str, str]) -> tuple[int, list[int]]:
    """Requests one at a time on the group until the dark deployment's breaker is open: (how
    many it took, the statuses of those that failed)."""
    opened = asyncio.create_task(_breaker_opens(bus, "primary"))
    failed: list[int] = []
    sent = 0
    try:
        while not opened.done() and sent < 200:
            await _direct(url, 1, headers, model=GROUP, failed=failed)
            sent += 1
        await asyncio.wait_for(opened, 30)
    finally:
        opened.cancel()
    return sent, failed


def _dark_row(lat: list[float], failed: list[int]) -> dict[str, Any]:
    return {
        "n": len(lat),
        "p50_ms": round(percentile(lat, 50), 3),
        "p99_ms": round(percentile(lat, 99), 3),
        "failed": len(failed),
        "failed_statuses": sorted(set(failed)),
    }


@benchmark(
    "gateway_http",
    (
        *(
            f"gw_{what}_{w}"
            for w in ("c1", "c32")
            for what in ("added_p50_ms", "added_p99_ms", "requests_per_s", "cpu_us_per_request")
        ),
        "gw_dark_p50_ms",
        "gw_dark_failed",
    ),
)
async def gateway_http(ctx: Ctx) -> list[Figure]:
    """`chainyard gateway` vs the Portkey gateway over a direct 20 ms call; a dark provider."""
    sizes = {1: ctx.n("n_c1", 400, 40), 32: ctx.n("n_c32", 4000, 320)}
    rounds = max(1, ctx.n("rounds", 3, 1))
    n_dark = {"portkey": ctx.n("n_dark_portkey", 40, 6), "chainyard": ctx.n("n_dark", 400, 40)}
    if importlib.util.find_spec("chainyard.gateway.cli") is None:  # before the gateway landed
        why = "`chainyard gateway` (chainyard/gateway/cli.py) is not in this tree"
        print(f"   skipped: {why}", flush=True)
        ctx.notes.append(f"gateway_http: skipped: {why}")
        return []
    load_before = load_average()
    node, script, skipped = await portkey_or_skip(ctx, "gateway_http")
    dark: dict[str, dict[str, Any]] = {}
    opening: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        async with (
            NatsServer() as nats,
            sandbox(LATENCY_MS, None, load=True) as (url, sandbox_pid),
            blackhole() as dark_url,
            contextlib.AsyncExitStack() as stack,
        ):
            cfg = tmp / "chainyard.toml"
            cfg.write_text(_config(url, dark_url))
            common = ["--nats", nats.url, "--config", str(cfg)]
            bus = await open_bus(nats.url, name="bench-gateway-http")
            stack.push_async_callback(bus.close)
            raw_key = await _bench_key(bus)
            router = await stack.enter_async_context(service(["router", *common], tmp, "router"))
            worker = await stack.enter_async_context(service(["worker", *common], tmp, "worker"))
            gw_url, gw_pid = await stack.enter_async_context(chainyard_gateway(common, tmp))
            auth = {"Authorization": f"Bearer {raw_key}"}
            direct = _Path("direct", lambda _p, n, w: _direct(url, n, window=w))
            chainyard = _Path("chainyard", lambda _p, n, w: _direct(gw_url, n, auth, w))
            # the same chain submitted on NATS, no HTTP: splits chainyard's figure into the pool's
            # part and the gateway's (conditions only)
            driver = Driver(bus)
            await driver.start()
            on_nats = _Path("nats", lambda p, n, w: _chains(driver, p, n, w))
            on_nats.pids = {"router": router.pid, "worker": worker.pid}
            direct.pids = {"driver": os.getpid()}  # the bare client's own CPU: a yardstick
            chainyard.pids = {"gateway": gw_pid, "router": router.pid, "worker": worker.pid}
            if nats.pid:
                chainyard.pids["nats_server"] = nats.pid
            paths = [direct, chainyard, on_nats]
            pk_url = ""
            if node:
                pk, pk_url = await portkey_path(stack, node, script, url)
                paths.insert(1, pk)
            for p in paths:
                p.pids["sandbox"] = sandbox_pid
            for p in paths:  # warm: connections open, the router and worker up, node's JIT
                await p.call(f"warm-{p.name}-", ctx.n("warm", 600, 64), 32)
            for r in range(rounds):
                for w in WINDOWS:
                    for p in paths if r % 2 == 0 else paths[::-1]:
                        await p.measure(f"r{r}-c{w}-", sizes[w], w)

            # -- the primary target dark ------------------------------------------------------
            if node:
                fallback = {
                    "strategy": {"mode": "fallback"},
                    "request_timeout": int(DARK_TIMEOUT_S * 1000),
                    "targets": [
                        {"provider": "openai", "custom_host": f"{h}/v1", "api_key": "sk-bench"}
                        for h in (dark_url, url)
                    ],
                }
                pk_headers = {"x-portkey-config": json.dumps(fallback)}
                failed: list[int] = []
                lat = await _direct(pk_url, n_dark["portkey"], pk_headers, failed=failed)
                dark["portkey"] = _dark_row(lat, failed)
            sent, opening_failed = await _until_open(bus, gw_url, auth)
            opening = {"requests": sent, "failed": len(opening_failed)}
            failed = []
            lat = await _direct(gw_url, n_dark["chainyard"], auth, model=GROUP, failed=failed)
            dark["chainyard"] = _dark_row(lat, failed)
    gateway = {
        "direct": ("driver",),
        "portkey": ("portkey",),
        "chainyard": ("gateway",),
        "nats": ("router", "worker"),
    }
    by_window: dict[int, dict[str, Any]] = {}
    for w in WINDOWS:
        rows = added_rows(paths, gateway, w)
        cy_cpu = rows["chainyard"]["cpu_us_per_request"]
        rows["chainyard"]["gateway_router_worker_cpu_us_per_request"] = round(
            sum(cy_cpu.get(k, 0.0) for k in ("gateway", "router", "worker")), 1
        )
        by_window[w] = rows
    wake = await idle_wake(LATENCY_MS, ctx.n("wake_n", 200, 40))
    cond: dict[str, Any] = {
        "provider": f"chainyard.sandbox.load, fixed {LATENCY_MS:g} ms, its own process",
        "client": "the worker's HTTP client (bench.added_latency._direct), POST "
        "/v1/chat/completions, the same for all three",
        "portkey": f"@portkey-ai/gateway {_pinned_version()} on node, --headless, free port,"
        " x-portkey-provider: openai, x-portkey-custom-host: the stand-in"
        if node
        else f"skipped: {skipped}",
        "chainyard": "`chainyard gateway` (a KV key with an rpm limit of "
        f"{BENCH_RPM}), nats-server, `chainyard router`, `chainyard worker` (256 slots), each "
        "its own process; a one-step chain per request",
        "gateway_cpu": "Portkey: its node process; chainyard: the gateway process (router + "
        "worker + gateway in gateway_router_worker_cpu_us_per_request); direct: the driver's "
        "own client, a yardstick",
        "nats": "the same one-step chain submitted on NATS by this driver (bench.added_latency's "
        "Driver, to the step's stored answer as `Client.answer`), no HTTP: chainyard's added "
        "latency minus this one's is the gateway's own",
        "rounds": rounds,
        "order": "rounds alternate direct, Portkey, chainyard, nats and the reverse; each window "
        "in turn",
        "results": {f"c{w}": rows for w, rows in by_window.items()},
        "dark": {
            "primary": "accepts connections, never answers",
            "timeout_s": DARK_TIMEOUT_S,
            "portkey": "fallback mode: targets [dark, stand-in], request_timeout "
            f"{int(DARK_TIMEOUT_S * 1000)} ms",
            "chainyard": f"group {GROUP} [dark (cheaper), stand-in], strategy cheapest, pool "
            f"timeout_s {DARK_TIMEOUT_S}; measured once the dark deployment's breaker is open",
            "breaker_opened_after": opening,
            "in_flight": 1,
            "results": dark,
        },
        "idle_wake": wake,
        "load_before": load_before,
        "load_after": load_average(),
        "goal": "chainyard adds no more than Portkey at p50 and p99, at 1 and 32 in flight; "
        "no failed request with a dark provider once its breaker is open",
    }
    figures: list[Figure] = []
    for w in WINDOWS:
        rows = by_window[w]
        cy, peer = rows["chainyard"], rows.get("portkey")
        for what, unit in (
            ("added_p50_ms", "ms"),
            ("added_p99_ms", "ms"),
            ("requests_per_s", "req/s"),
            ("cpu_us_per_request", "us"),
        ):
            mine = "gateway_cpu_us_per_request" if what == "cpu_us_per_request" else what
            if peer:
                base_name, base = f"portkey_{what}_c{w}", peer[mine]
            elif what.startswith("added"):
                pct = what.split("_")[1]
                base_name, base = f"direct_{pct}_ms_c{w}", rows["direct"][f"{pct}_ms"]
            else:
                base_name, base = f"direct_{what}_c{w}", rows["direct"][mine]
            figures.append(Figure(f"gw_{what}_c{w}", cy[mine], unit, base_name, base, cond))
    mine_dark = dark["chainyard"]
    peer_dark = dark.get("portkey")
    for what, unit in (("p50_ms", "ms"), ("failed", "requests")):
        base_name = "portkey_fallback_" + what if peer_dark else "none"
        base = peer_dark[what] if peer_dark else 0.0
        figures.append(Figure(f"gw_dark_{what}", mine_dark[what], unit, base_name, base, cond))
    worse = [
        f.name
        for f in figures
        if f.baseline_name.startswith("portkey")
        and f.name.startswith("gw_added")
        and f.value > f.baseline_value
    ]
    if worse:
        print(f"   chainyard adds more than Portkey in: {', '.join(worse)}", file=sys.stderr)
    return figures


@benchmark("limits_admit", ("limits_admit_us_leased",))
async def limits_admit(ctx: Ctx) -> list[Figure]:
    """`Limits.admit` for a key with an rpm limit: leased (default) vs a KV write per request."""
    n = ctx.n("n_admit", 5000, 500)
    async with NatsServer() as nats:
        bus = await open_bus(nats.url, name="bench-limits")
        try:
            store = await KeyStore.open(bus.js)
            raw, _ = await create_key(store.kv, checked_grant(tenant=TENANT, rpm=10**9))
            await asyncio.wait_for(store.until(lambda s: s.authenticate(raw) is not None), 5)
            limits = await Limits.open(bus.js)
            per_us: dict[str, float] = {}
            for label, lease_max in (("cas", 1), ("leased", limits.lease_max), ("cas2", 1)):
                limits.lease_max = lease_max
                t0 = time.perf_counter()
                for _ in range(n):
                    grant = store.authenticate(raw)  # as the gateway does per request
                    assert grant is not None
                    if await limits.admit(grant, tokens_estimate=100) is not None:
                        raise RuntimeError("the bench key was refused")
                per_us[label] = (time.perf_counter() - t0) / n * 1e6
            free = Grant(key_id="free", tenant=TENANT)
            t0 = time.perf_counter()
            for _ in range(n):
                await limits.admit(free, tokens_estimate=100)
            per_us["no_limit"] = (time.perf_counter() - t0) / n * 1e6
            await limits.stop()
            await store.stop()
        finally:
            await bus.close()
    cas = (per_us["cas"] + per_us["cas2"]) / 2  # before and after the leased run
    cond = {
        "n": n,
        "in_flight": 1,
        "what": "KeyStore.authenticate + Limits.admit, rpm limit far away, one process, "
        "nats-server on the same machine",
        "us_per_admit": {k: round(v, 2) for k, v in per_us.items()},
        "lease_max": LEASE_MAX,
    }
    return [Figure("limits_admit_us_leased", per_us["leased"], "us", "cas_per_request", cas, cond)]
