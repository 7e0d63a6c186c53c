"""Figures added_latency_p50_ms / _p99_ms: what chainyard adds to one provider call.

One-step chains run end to end (intake publish -> router -> work queue -> worker -> zero-latency
sandbox -> the step's answer, stored, seen by this driver as `Client.answer` sees it) at half of the
measured saturation throughput, in an open loop. Each part is its own OS process, as deployed:
nats-server, the router (`chainyard router`), one worker (`chainyard worker`), the provider
(the load sandbox, chainyard.sandbox.load: OpenAI's wire format at ~20 us a request, so that a
stand-in for a remote provider takes little of the two cores) and this driver. The baseline, in
the same run, is a direct call to the same sandbox with the worker's own HTTP client
(workers/providers/_http.py, one call at a time); the figure is the chain's percentile minus
the direct call's. The legs are recorded one chain at a time and at half of saturation.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from chainyard.contracts import Chain, LlmStep, Message, Params, encode
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.workers.providers._http import HttpClient

from .calibrate import load_average
from .core import Ctx, Figure, benchmark
from .drive import percentile
from .workers import _stop, sandbox

TENANT = "bench"
POOL = "a"
SLOTS = 256


def _config(base_url: str) -> str:
    return (
        f'[[deployments]]\nname = "a"\npool = "{POOL}"\nmodel = "gpt-4o-mini"\n'
        f'[[pools]]\nname = "{POOL}"\nprovider = "openai"\nbase_url = "{base_url}/v1"\n'
        f"slots = {SLOTS}\ntimeout_s = 60\n"
    )


@contextlib.asynccontextmanager
async def service(
    args: list[str], tmp: Path, name: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`chainyard <args>` as its own process, its output in a log shown if it fails."""
    log_path = tmp / f"{name}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainyard.cli", *args,
            stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield proc
    finally:
        await _stop(proc)
        if proc.returncode not in (0, None):
            tail = log_path.read_text()[-2000:]
            print(f"{name} exited {proc.returncode}:\n{tail}", file=sys.stderr)


class Driver:
    """Submits one-step chains and times each to its answer, as `Client.answer` returns it:
    the step's `step.completed`, or for a step that does not answer the chain's end (one core
    subscription for all chains, so that the driver's own work stays small at thousands in
    flight).

    It also sees each chain's assignment and chain event as they are published, so the time
    splits into legs: intake -> assignment (router), assignment -> step event (worker and
    provider), and step event -> chain event (the router recording the end, after the answer).
    """

    def __init__(self, bus: Bus, deadline_ms: int | None = None) -> None:
        self.bus = bus
        self.deadline_ms = deadline_ms  # each chain's (bench.deadlines)
        self.waiting: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self.offset = len(f"{bus.subjects.prefix}.events.{TENANT}.")
        self.marks: dict[str, list[float]] = {}  # chain -> [submitted, assigned, step event]
        self.legs: list[tuple[float, float, float]] = []

    async def start(self) -> None:
        prefix = f"{self.bus.subjects.prefix}.events.{TENANT}"
        await self.bus.nc.subscribe(f"{prefix}.*.chain.*", cb=self._on_event)
        await self.bus.nc.subscribe(f"{prefix}.*.step.*", cb=self._on_mark)
        await self.bus.nc.subscribe(self.bus.subjects.work(POOL), cb=self._on_mark)
        await self.bus.nc.flush()

    async def _on_mark(self, msg: Msg) -> None:
        now = time.perf_counter()
        if msg.subject.startswith(self.bus.subjects.prefix + ".work."):
            key = (msg.headers or {}).get("Nats-Msg-Id", "").split(".")[1]  # <tenant>.<chain>...
        else:
            key = msg.subject[self.offset :].partition(".")[0]
        if (marks := self.marks.get(key)) is not None:
            marks.append(now)
        if msg.subject.endswith(".step.completed"):
            self._answer(key, now, "completed")

    def _answer(self, key: str, now: float, kind: str) -> None:
        fut = self.waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result((now, kind))

    async def _on_event(self, msg: Msg) -> None:
        now = time.perf_counter()
        key, _, kind = msg.subject[self.offset :].partition(".chain.")
        marks = self.marks.pop(key, None)
        if marks is not None and len(marks) == 3:
            t0, assigned, stepped = marks
            self.legs.append((assigned - t0, stepped - assigned, now - stepped))
        self._answer(key, now, kind)

    async def run(self, key: str) -> float:
        step = LlmStep(
            id="s",
            model="gpt-4o-mini",
            messages=[Message(role="user", content="hi")],
            params=Params(max_tokens=16),
        )
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        t0 = time.perf_counter()
        self.marks[key] = [t0]
        await self.bus.publisher.publish(
            self.bus.subjects.submit(TENANT),
            encode(Chain(id=key, steps=[step], deadline_ms=self.deadline_ms)),
            headers={"Nats-Msg-Id": key},
        )
        t1, kind = await asyncio.wait_for(fut, 60)
        if kind != "completed":
            raise RuntimeError(f"chain {key} ended {kind}")
        return (t1 - t0) * 1000


async def _direct(
    base_url: str,
    n: int,
    headers: dict[str, str] | None = None,
    window: int = 1,
    *,
    model: str = "gpt-4o-mini",
    failed: list[int] | None = None,
) -> list[float]:
    """n chat completions POSTed to `base_url`/v1 with the worker's HTTP client, `window` at a
    time (bench.gateways sends the same calls through a peer gateway with its `headers`). An
    answer other than 200 raises, or with `failed` is appended there (its latency is kept)."""
    body = encode(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    )
    client = HttpClient(f"{base_url}/v1", {"Content-Type": "application/json", **(headers or {})})
    out: list[float] = []

    async def calls(count: int) -> None:
        for _ in range(count):
            t0 = time.perf_counter()
            status, _, _ = await client.post("/chat/completions", body)
            out.append((time.perf_counter() - t0) * 1000)
            if status != 200 and failed is None:
                raise RuntimeError(f"{base_url} answered {status}")
            if status != 200 and failed is not None:
                failed.append(status)

    try:
        await asyncio.gather(*(calls(n // window + (i < n % window)) for i in range(window)))
    finally:
        await client.aclose()
    return out


async def idle_wake(idle_ms: float, n: int) -> dict[str, Any]:
    """A yardstick for the 1-in-flight rows: one HTTP call to a zero-latency stand-in, made back
    to back and made after `idle_ms` of idleness, as every process on a path sits idle through
    the provider's latency. Where idle CPUs sleep deeply (this VM's vCPUs halt), a process
    woken after idling answers later, so a path through more processes pays it more often: a
    durable chain wakes nats-server and the router or gateway where a proxy wakes itself."""
    body = encode(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    )
    async with sandbox(0.0, None, load=True) as (url, _):
        client = HttpClient(f"{url}/v1", {"Content-Type": "application/json"})
        try:
            out: dict[str, list[float]] = {"back_to_back": [], "after_idle": []}
            for i in range(2 * n):
                idle = i % 2 == 1  # interleaved, so load drift hits both alike
                if idle:
                    await asyncio.sleep(idle_ms / 1000)  # the idleness measured, not a race
                t0 = time.perf_counter()
                await client.post("/chat/completions", body)
                out["after_idle" if idle else "back_to_back"].append(
                    (time.perf_counter() - t0) * 1000
                )
        finally:
            await client.aclose()
    p50 = {k: round(percentile(v, 50), 3) for k, v in out.items()}
    return {
        "idle_ms": idle_ms,
        "calls": n,
        "p50_ms_back_to_back": p50["back_to_back"],
        "p50_ms_after_idle": p50["after_idle"],
        "wake_cost_ms": round(p50["after_idle"] - p50["back_to_back"], 3),
    }


async def _open_loop(d: Driver, prefix: str, n: int, rate: float) -> list[float]:
    jobs = []
    start = time.perf_counter()
    for i in range(n):
        if (wait := start + i / rate - time.perf_counter()) > 0:
            await asyncio.sleep(wait)  # pacing the offered load, not waiting on a race
        jobs.append(asyncio.create_task(d.run(f"{prefix}{i}")))
    return list(await asyncio.gather(*jobs))


async def _closed_loop(d: Driver, prefix: str, n: int, window: int) -> float:
    sem = asyncio.Semaphore(window)

    async def one(i: int) -> float:
        async with sem:
            return await d.run(f"{prefix}{i}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t0)


def _legs(legs: list[tuple[float, float, float]]) -> dict[str, float] | None:
    names = ("intake_to_assignment", "assignment_to_step_event", "step_event_to_chain_event")
    if not legs:
        return None
    return {
        name: round(percentile([leg[i] * 1000 for leg in legs], 50), 3)
        for i, name in enumerate(names)
    }


@dataclass
class OnePool:
    url: str  # the load sandbox's
    nats: NatsServer
    bus: Bus
    router: asyncio.subprocess.Process
    worker: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def one_pool(name: str, nats_args: list[str] | None = None) -> AsyncIterator[OnePool]:
    """nats-server (with `nats_args`), the load sandbox, `chainyard router` and `chainyard
    worker` (pool `a`), each its own OS process, and this driver's bus."""
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        async with (
            NatsServer(extra_args=nats_args) as nats,
            sandbox(0.0, None, load=True) as (url, _),
        ):
            cfg = tmp / "chainyard.toml"
            cfg.write_text(_config(url))
            common = ["--nats", nats.url, "--config", str(cfg)]
            bus = await open_bus(nats.url, name=name)
            try:
                async with (
                    service(["router", *common], tmp, "router") as router,
                    service(["worker", *common, "--pool", POOL], tmp, "worker") as worker,
                ):
                    yield OnePool(url, nats, bus, router, worker)
            finally:
                await bus.close()


@benchmark("added_latency", ("added_latency_p50_ms", "added_latency_p99_ms"))
async def added_latency(ctx: Ctx) -> list[Figure]:
    """End-to-end chain latency at half of saturation minus a direct HTTP call to the sandbox."""
    n = ctx.n("n", 3000, 400)
    sat_n = ctx.n("sat_n", 3000, 500)
    load_before = load_average()
    async with one_pool("bench-added-latency") as stack:
        d = Driver(stack.bus)
        await d.start()
        direct = await _direct(stack.url, ctx.n("direct_n", 1000, 200))
        await _closed_loop(d, "w-", 200, 16)  # warm: router and worker connected
        d.legs.clear()
        alone = [await d.run(f"a-{i}") for i in range(ctx.n("alone_n", 300, 50))]
        alone_legs = _legs(d.legs)
        saturation = await _closed_loop(d, "s-", sat_n, SLOTS)
        rate = saturation / 2
        d.legs.clear()
        lat = await _open_loop(d, "h-", n, rate)
        direct += await _direct(stack.url, ctx.n("direct_n", 1000, 200))
    d50, d99 = percentile(direct, 50), percentile(direct, 99)
    c50, c99 = percentile(lat, 50), percentile(lat, 99)
    cond: dict[str, Any] = {
        "N": n,
        "saturation_chains_per_s": round(saturation, 1),
        "offered_per_s": round(rate, 1),
        "chain_p50_ms": round(c50, 3),
        "chain_p99_ms": round(c99, 3),
        "one_at_a_time_p50_ms": round(percentile(alone, 50), 3),
        "one_at_a_time_p99_ms": round(percentile(alone, 99), 3),
        "direct_p50_ms": round(d50, 3),
        "direct_p99_ms": round(d99, 3),
        "legs_p50_ms": _legs(d.legs),
        "one_at_a_time_legs_p50_ms": alone_legs,
        "direct": "the worker's HTTP client (workers/providers/_http.py),"
        " sequential, half before and half after the chains",
        "goals_ms": {"p50": 1, "p99": 3},
        "process": "nats-server, router, worker, load sandbox and driver: five OS processes",
        "load_before": load_before,
        "load_after": load_average(),
    }
    return [
        Figure("added_latency_p50_ms", c50 - d50, "ms", "direct_http_p50_ms", d50, cond),
        Figure("added_latency_p99_ms", c99 - d99, "ms", "direct_http_p99_ms", d99, cond),
    ]
