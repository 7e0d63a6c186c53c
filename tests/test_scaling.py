"""Autoscaling on queue lag, proven against the real parts (docs/SCALING.md).

A nats-server with its monitoring port, two `chainyard router` processes, and `chainyard
worker` processes of one pool started and stopped (SIGTERM) by a test double of KEDA's
nats-jetstream scaler (keda_double.py) that reads the pool consumer's lag from `/jsz` exactly as
KEDA does. The provider is the sandbox with a fixed latency. Load rises (a burst of chains from
two tenants that use the same ids), falls, rises again and falls. Replicas follow the lag up
and down, throughput follows the replica count (a ratio within this run), and the workers
scaled down drain: every chain ends once, every step is called and completed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from pathlib import Path

import pytest
from helpers import alive, free_ports, kill_all, start_cli, start_routers, wait_until
from keda_double import HPA_TOLERANCE, Keda, ScaledObject, Tick, hpa_desired
from nats.aio.msg import Msg
from scale_support import two_step_chain
from worker_support import POOL, live_workers, toml

from chainyard.contracts import Topology, encode, event_decoder
from chainyard.ledger import audit
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

TENANTS = ("ta", "tb")  # the same chain ids in both
SLOTS = 2  # per worker process; KEDA's lagThreshold is the pool's slots
LATENCY_MS = 250
MAX_REPLICAS = 3


def config_toml(sandbox_url: str) -> str:
    return toml(sandbox_url, slots=SLOTS, deployment="d-sim", price=(1.0, 2.0))


# -- the formula, pure ---------------------------------------------------------------------------


def test_hpa_formula_is_ceil_lag_over_threshold_bounded_with_tolerance() -> None:
    so = ScaledObject(monitoring="", stream="s", consumer="c", lag_threshold=4, max_replicas=5)
    assert [hpa_desired(lag, 1, so) for lag in (0, 1, 4, 5, 8, 9, 100)] == [1, 1, 1, 2, 2, 3, 5]
    assert hpa_desired(0, 0, so) == 1  # activated from zero: at least one
    assert hpa_desired(17, 4, so) == 4  # 17 / 16 is within the 10 % tolerance: stay
    assert HPA_TOLERANCE == 0.1 and hpa_desired(18, 4, so) == 5  # 18 / 16: out of it
    bounded = ScaledObject(monitoring="", stream="s", consumer="c", lag_threshold=4, min_replicas=2)
    assert hpa_desired(0, 3, bounded) == 2


# -- the proof -----------------------------------------------------------------------------------


def windows(ticks: list[Tick], done: list[float]) -> dict[int, float]:
    """Steps per second while `ready` replicas served a saturated pool (work waiting in the
    stream), per replica count: the best window of at least 1 s of each count."""
    best: dict[int, float] = {}
    i = 0
    while i < len(ticks):
        if ticks[i].lag.pending == 0 or ticks[i].ready == 0:
            i += 1
            continue
        j = i
        while (
            j + 1 < len(ticks)
            and ticks[j + 1].ready == ticks[i].ready
            and ticks[j + 1].lag.pending > 0
        ):
            j += 1
        k, t0, t1 = ticks[i].ready, ticks[i].t, ticks[j].t
        if t1 - t0 >= 1.0:
            rate = sum(t0 <= t < t1 for t in done) / (t1 - t0)
            best[k] = max(best.get(k, 0.0), rate)
        i = j + 1
    return best


@pytest.mark.timeout(240)
async def test_keda_formula_scales_real_workers_up_and_down_and_sigterm_drains(
    tmp_path: Path,
) -> None:
    [http] = free_ports(1)
    topo = Topology()
    procs: list[asyncio.subprocess.Process] = []
    async with (
        NatsServer(extra_args=["-m", str(http)]) as server,
        SandboxServer(SandboxConfig(latency_ms=LATENCY_MS, capture=0)) as sandbox,
    ):
        cfg = tmp_path / "chainyard.toml"
        cfg.write_text(config_toml(sandbox.url))
        bus: Bus = await open_bus(server.url, name="test", topology=topo)
        done: list[float] = []  # arrival time of every step.completed
        ended: set[tuple[str, str]] = set()

        async def on_event(msg: Msg) -> None:
            kind = msg.subject.rsplit(".", 1)[-1]
            if msg.subject.endswith("step.completed"):
                done.append(time.monotonic())
            elif kind in ("completed", "failed", "cancelled") and ".chain." in msg.subject:
                ev = event_decoder.decode(msg.data)
                ended.add((ev.tenant, ev.chain_id))

        sub = await bus.nc.subscribe("cy.events.>", cb=on_event)
        n_workers = 0

        async def start_worker() -> asyncio.subprocess.Process:
            nonlocal n_workers
            n_workers += 1
            args = ["worker", "--nats", server.url, "--config", str(cfg), "--pool", POOL]
            p = await start_cli(tmp_path / f"worker{n_workers}.log", *args)
            procs.append(p)
            return p

        async def ready_pids() -> set[int]:
            ids = await live_workers(bus)
            return {p.pid for p in procs if any(f"-{p.pid}-" in w for w in ids)}

        accepted: set[tuple[str, str]] = set()

        async def burst(prefix: str, n: int) -> None:
            for i in range(n):
                for t in TENANTS:
                    c = two_step_chain(t, f"{prefix}-{i:03d}")
                    await bus.js.publish(topo.subjects.submit(t), encode(c))
                    accepted.add((t, c.id))

        so = ScaledObject(
            monitoring=f"http://127.0.0.1:{http}",
            stream=topo.work.name,
            consumer=topo.pool_consumer(POOL).durable,
            lag_threshold=SLOTS,
            min_replicas=1,  # see docs/SCALING.md: a pool at zero gets no work to wake it
            max_replicas=MAX_REPLICAS,
            up_period_s=5.0,  # HPA behavior: +1 pod per 5 s, so each count runs a while
        )
        try:
            procs += await start_routers(tmp_path, server.url, cfg)
            async with Keda(so, start_worker, ready_pids) as keda:
                await wait_until(
                    lambda: keda.ticks and keda.ticks[-1].ready == 1, 60, f"1 ready {keda.errors}"
                )
                for phase, n in (("up1", 60), ("up2", 30)):
                    start = len(keda.ticks)
                    await burst(phase, n)
                    await wait_until(
                        lambda s=start: any(k.replicas == MAX_REPLICAS for k in keda.ticks[s:]),
                        60,
                        f"{phase}: scale-up to {MAX_REPLICAS}",
                    )
                    await wait_until(lambda: accepted <= ended, 120, f"the {phase} chains to end")
                    # lag gone: back down to min_replicas, each one drained by SIGTERM
                    await wait_until(lambda: len(keda.replicas) == 1, 30, "scale-down to 1")
                    mark = len(keda.ticks)
                    await wait_until(lambda m=mark: len(keda.ticks) > m, 5, "one more tick")
                timeline = keda.line()
                ticks = list(keda.ticks)
                stopped = list(keda.stopped)
            # every worker scaled down exited by itself, cleanly, after draining
            codes = [await asyncio.wait_for(p.wait(), 30) for p in stopped]
            assert codes == [0] * len(stopped), (codes, timeline)
            assert len(stopped) >= 2 * (MAX_REPLICAS - 1), timeline  # down twice, one by one

            # replicas followed the lag: at every tick the count is what the formula wanted
            # once the HPA's rate limits allowed; up to max under the backlog, down to min after
            ups = [k for k in ticks if k.lag.total >= MAX_REPLICAS * SLOTS * 2]
            assert ups and max(k.replicas for k in ups) == MAX_REPLICAS, timeline
            assert all(k.desired == MAX_REPLICAS for k in ups), timeline
            assert ticks[-1].lag.total == 0 and ticks[-1].replicas == 1, timeline
            for a, b in itertools.pairwise(ticks):
                assert abs(b.replicas - a.replicas) <= 1, timeline  # one pod per step
                if b.replicas > a.replicas:
                    assert b.desired > a.replicas, timeline  # up only when the lag asked
                if b.replicas < a.replicas:
                    assert b.desired < a.replicas, timeline

            # throughput followed the replica count, as a ratio within this run
            rates = windows(ticks, done)
            print(f"\nscaling timeline: {timeline}")
            assert 1 in rates and MAX_REPLICAS in rates, (rates, timeline)
            ratio = rates[MAX_REPLICAS] / rates[1]
            shown = {k: round(v, 1) for k, v in sorted(rates.items())}
            print(
                f"\nscaling: steps/s by ready replicas {shown}; "
                f"{MAX_REPLICAS} vs 1 = {ratio:.2f}x (slots {SLOTS}, sandbox {LATENCY_MS} ms)"
            )
            assert ratio > 1.5, (rates, timeline)

            # nothing lost, nothing repeated: every step called once, completed once
            report = await audit(bus.js, accepted, topology=topo, scenario="keda_scaling")
            assert report.ok, report.details()
            steps = 2 * len(accepted)
            assert (report.completed, len(done), sandbox.counts["openai.chat"]) == (
                len(accepted),
                steps,
                steps,
            ), report.line()
            info = await bus.js.consumer_info(so.stream, so.consumer)
            assert (info.num_redelivered, info.num_pending, info.num_ack_pending) == (0, 0, 0)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await kill_all(procs)
            await bus.close()
    assert not any(alive(p.pid) for p in procs)


@pytest.mark.timeout(180)
async def test_a_pool_scaled_to_zero_is_woken_by_its_queued_work(tmp_path: Path) -> None:
    """`scale.min_replicas = 0`: with no worker running, routers still send the pool's steps to
    its queue (the pool counts as live with no free slot), and that lag is what wakes it: the
    KEDA double takes the pool from zero to one, the chains complete, it goes back to zero
    after its cooldown, and a second round wakes it again from its consumer's pending count."""
    [http] = free_ports(1)
    topo = Topology()
    procs: list[asyncio.subprocess.Process] = []
    async with (
        NatsServer(extra_args=["-m", str(http)]) as server,
        SandboxServer(SandboxConfig(latency_ms=20, capture=0)) as sandbox,
    ):
        cfg = tmp_path / "chainyard.toml"
        cfg.write_text(config_toml(sandbox.url) + "\n[pools.scale]\nmin_replicas = 0\n")
        bus: Bus = await open_bus(server.url, name="test", topology=topo)
        n = itertools.count(1)

        async def start_worker() -> asyncio.subprocess.Process:
            args = ["worker", "--nats", server.url, "--config", str(cfg), "--pool", POOL]
            p = await start_cli(tmp_path / f"worker{next(n)}.log", *args)
            procs.append(p)
            return p

        async def no_pids() -> set[int]:
            return set()

        async def run_round(prefix: str) -> set[tuple[str, str]]:
            chains = {t: two_step_chain(t, f"{prefix}-0") for t in TENANTS}
            for t, c in chains.items():
                await bus.js.publish(topo.subjects.submit(t), encode(c))
            return {(t, c.id) for t, c in chains.items()}

        done: set[tuple[str, str]] = set()

        async def on_end(msg: Msg) -> None:
            ev = event_decoder.decode(msg.data)
            done.add((ev.tenant, ev.chain_id))

        await bus.nc.subscribe("cy.events.*.*.chain.completed", cb=on_end)

        so = ScaledObject(
            monitoring=f"http://127.0.0.1:{http}",
            stream=topo.work.name,
            consumer=topo.pool_consumer(POOL).durable,
            lag_threshold=SLOTS,
            min_replicas=0,
            max_replicas=1,
            cooldown_s=1.0,
        )
        try:
            procs += await start_routers(tmp_path, server.url, cfg)
            async with Keda(so, start_worker, no_pids) as keda:
                first = await run_round("wake1")
                await wait_until(lambda: first <= done, 90, "round 1 to complete from zero")
                await wait_until(lambda: len(keda.stopped) == 1, 30, "back to zero")
                assert await asyncio.wait_for(keda.stopped[0].wait(), 30) == 0
                second = await run_round("wake2")
                # woken by the consumer's own pending count this time (it exists now)
                await wait_until(lambda: second <= done, 90, "round 2 to complete from zero")
                timeline = keda.line()
            assert len(keda.stopped) + len(keda.replicas) == 2, timeline  # woken twice
            woke = [k for k in keda.ticks if k.replicas == 0 and k.lag.total > 0]
            assert woke, timeline  # work waited in the queue while no worker ran
            report = await audit(bus.js, first | second, topology=topo, scenario="zero")
            assert report.ok and report.completed == 4, report.details()
            assert sandbox.counts["openai.chat"] == 8  # two steps a chain, each called once
        finally:
            await kill_all(procs)
            await bus.close()
