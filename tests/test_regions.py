"""Regions, live (docs/SCALING.md, "Regions"): a 3-node NATS cluster, one node per region, every
stream and bucket with 3 replicas; latency between regions from delaying TCP proxies on the
cluster routes and on cross-region client links. Each region runs a `chainyard worker` for its
own pool (`region` in the config) and a `chainyard router --region`, connected to its region's
node. Two tenants submit chains with the same ids from every region.

1. With only eu's router up, every step runs on eu's pool although us and ap have equally
   priced, idle pools: the router keeps work in its region.
2. Under load, eu is cut off: its node, router and worker are SIGKILLed; then us's worker is
   drained away (SIGTERM), so us's router has no pool at home and fails over to ap. Every
   chain ends in the surviving regions, except the ones with a step in flight on eu's pool,
   which wait for it in the pool's queue (nothing else can take a message addressed to it).
3. eu comes back (node restarted on its store, a new worker): those end too. The ledger over
   everything: no chain lost, none ended twice, no step completed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import kill_all, start_cli, wait_until
from nats.aio.msg import Msg
from nats.js.errors import NoKeysError
from scale_support import RegionCluster, two_step_chain

from chainyard.contracts import (
    Chain,
    ChainState,
    StepCompleted,
    Topology,
    encode,
    event_decoder,
    load_config,
)
from chainyard.ledger import audit, collect
from chainyard.runtime.nats import Bus, connect, open_bus
from chainyard.sandbox import SandboxConfig, SandboxServer

REGIONS = ["eu", "us", "ap"]
DELAY_S = 0.02  # one way, each direction, between regions
TENANTS = ("ta", "tb")
Key = tuple[str, str]


def config_toml(sandbox_url: str) -> str:
    pools = "".join(
        f"""
[[deployments]]
name = "d-{r}"
pool = "sim-{r}"
model = "m"
price = {{ input_per_mtok = 1.0, output_per_mtok = 2.0 }}

[[pools]]
name = "sim-{r}"
region = "{r}"
provider = "openai"
base_url = "{sandbox_url}/v1"
slots = 32
timeout_s = 30
"""
        for r in REGIONS
    )
    # Replicas 3 (one per region); a step of a lost worker is redelivered after 3 s.
    return f"replicas = 3\nwork_ack_wait_s = 3\ncapacity_wait_s = 120\n{pools}"


class Ledger:
    """What the intake accepted, and where each step ran (step events seen by a client)."""

    def __init__(self) -> None:
        self.accepted: set[Key] = set()
        self.ran: dict[Key, list[tuple[str, float]]] = {}  # step completions: (pool, when)

    async def on_event(self, msg: Msg) -> None:
        ev = event_decoder.decode(msg.data)
        if isinstance(ev, StepCompleted):
            key = (ev.tenant, ev.chain_id)
            self.ran.setdefault(key, []).append((ev.target.pool, time.monotonic()))

    def pools(self, keys: set[Key], after: float = 0.0) -> Counter[str]:
        return Counter(p for k in keys for p, t in self.ran.get(k, []) if t >= after)


async def submit(bus: Bus, tenant: str, chain: Chain, ledger: Ledger, within_s: float = 60) -> None:
    """Publish until the intake stream acknowledges (leaders move when a region goes): the same
    chain again runs once (the router deduplicates), so a retry after a lost ack is harmless."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            await bus.js.publish(bus.topology.subjects.submit(tenant), encode(chain), timeout=5)
            ledger.accepted.add((tenant, chain.id))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def load(buses: list[Bus], prefix: str, n: int, ledger: Ledger) -> set[Key]:
    """n ids, each used by both tenants, spread over the regions' clients, all at once."""
    jobs = [
        (bus, t, two_step_chain(t, f"{prefix}-{i:03d}"))
        for (i, t), bus in zip(
            itertools.product(range(n), TENANTS), itertools.cycle(buses), strict=False
        )
    ]
    await asyncio.gather(*(submit(b, t, c, ledger) for b, t, c in jobs))
    return {(t, c.id) for _, t, c in jobs}


def waits_on(state: ChainState, pool: str) -> bool:
    return any(
        st.status == "dispatched" and st.target is not None and st.target.pool == pool
        for st in state.steps.values()
    )


@pytest.mark.timeout(180)
async def test_router_keeps_work_in_its_region_and_chains_survive_a_region_cut(
    tmp_path: Path,
) -> None:
    cluster = RegionCluster(tmp_path / "cluster", REGIONS, DELAY_S)
    procs: dict[str, asyncio.subprocess.Process] = {}
    buses: dict[str, Bus] = {}
    async with SandboxServer(SandboxConfig(latency_ms=150, capture=0)) as sandbox:
        cfg = tmp_path / "chainyard.toml"
        cfg.write_text(config_toml(sandbox.url))
        topo: Topology = load_config(cfg).topology
        ledger = Ledger()

        async def start(name: str, *args: str) -> None:
            region = name.split("-")[-1]
            nats = ["--nats", cluster.url(region), "--config", str(cfg)]
            procs[name] = await start_cli(tmp_path / f"{name}.log", *args, *nats)

        async def all_pools_live() -> bool:
            try:
                keys = await buses["us"].capacity.keys()
            except Exception:  # no keys yet
                return False
            return {k.split(".", 1)[0] for k in keys} == {f"sim-{r}" for r in REGIONS}

        async def ended() -> set[Key]:
            """Chains with a terminal event stored in the event stream (not just seen)."""
            info = await buses["us"].js.stream_info(
                topo.events.name, subjects_filter=f"{topo.subjects.prefix}.events.*.*.chain.*"
            )
            kinds = ("completed", "failed", "cancelled")
            parts = [s.split(".") for s in info.state.subjects or {}]
            return {(p[2], p[3]) for p in parts if p[-1] in kinds}

        async def all_ended(keys: set[Key]) -> bool:
            try:
                return keys <= await ended()
            except Exception:  # a leader election: ask again
                return False

        try:
            await cluster.start()
            for r in ("us", "eu", "ap"):  # the first one creates the streams and buckets
                buses[r] = await open_bus(cluster.url(r), name=f"client-{r}", topology=topo)
            # the latency is there: a round trip over a cross-region client link
            far = await connect(f"nats://{cluster.client_proxies[0].address}", name="far")
            t0 = time.monotonic()
            await far.flush()
            assert time.monotonic() - t0 >= 2 * DELAY_S
            await far.close()
            sub = await buses["us"].nc.subscribe("cy.events.>", cb=ledger.on_event)

            for r in REGIONS:
                await start(f"worker-{r}", "worker", "--pool", f"sim-{r}")
            await start("router-eu", "router", "--region", "eu")
            await wait_until(all_pools_live, 60, "a heartbeat of every pool")

            # 1. eu's router alone: everything on eu's pool, us and ap idle at the same price
            first = await load([buses["eu"]], "one", 10, ledger)
            await wait_until(lambda: all_ended(first), 60, "phase 1 to end")
            assert ledger.pools(first) == {"sim-eu": 2 * len(first)}, ledger.pools(first)

            # 2. routers in every region; under load, eu is cut off
            await start("router-us", "router", "--region", "us")
            await start("router-ap", "router", "--region", "ap")
            second = asyncio.create_task(load(list(buses.values()), "two", 20, ledger))
            eu_pool = topo.pool_consumer("sim-eu").durable

            async def eu_busy() -> bool:  # steps in the middle of their call on eu's pool
                info = await buses["us"].js.consumer_info(topo.work.name, eu_pool)
                return info.num_ack_pending >= 3

            await wait_until(eu_busy, 60, "phase 2 under way on eu's pool", 0.05)
            cut_at = time.monotonic()
            cluster.node("eu").signal(signal.SIGKILL)
            for name in ("router-eu", "worker-eu"):
                victim = procs.pop(name)
                victim.send_signal(signal.SIGKILL)
                await victim.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(buses.pop("eu").close(), 5)
            await wait_until(lambda: cluster.formed(["us", "ap"]), 60, "a meta leader in us/ap")
            two = await second
            waiting: set[Key] = set()
            stuck: dict[Key, str] = {}  # the last look at chains that neither ended nor wait on eu

            async def only_eu_work_left() -> bool:
                """Every chain has ended but those waiting on a step on eu's pool."""
                nonlocal waiting, stuck
                try:
                    missing = ledger.accepted - await ended()
                    snap = await collect(buses["us"].js, topo) if missing else None
                except Exception:  # a leader election: ask again
                    return False
                if snap is not None:
                    stuck = {
                        k: repr(snap.states.get(k) and {
                            sid: (st.status, st.target and st.target.pool)
                            for sid, st in snap.states[k].steps.items()
                        })
                        for k in missing
                        if not (k in snap.states and waits_on(snap.states[k], "sim-eu"))
                    }  # fmt: skip
                    if stuck:
                        return False
                waiting = missing
                return True

            async def settled() -> None:
                try:
                    await wait_until(only_eu_work_left, 90, "the chains outside eu to end", 0.5)
                except TimeoutError as e:
                    stuck_now = list(stuck.items())[:6]
                    raise AssertionError(f"{e}: {len(stuck)} stuck: {stuck_now}") from e

            # phase 2's work at home ends before us's pool is drained: a step queued for a pool
            # whose last worker leaves waits for a worker (or its deadline), by design
            await settled()
            # us's pool is drained away too (SIGTERM): us's router now has nothing at home
            drained = procs.pop("worker-us")
            drained.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(drained.wait(), 60) == 0

            async def us_pool_gone() -> bool:
                try:
                    keys = await buses["us"].capacity.keys()
                except NoKeysError:  # nothing left in the bucket at all
                    return True
                return not any(k.startswith("sim-us.") for k in keys)

            await wait_until(us_pool_gone, 10, "the drained worker's heartbeat to go")
            third = await load([buses["us"], buses["ap"]], "three", 10, ledger)

            await settled()
            assert waiting, "no chain was waiting on eu's pool: the cut missed its work"
            survivors = ledger.pools(ledger.accepted, after=cut_at)
            assert survivors["sim-us"] > 0 and survivors["sim-ap"] > 0, survivors
            print(
                f"\nregions: phase1 {ledger.pools(first)}; after the cut {dict(survivors)}; "
                f"{len(waiting)} chains waited for eu's pool"
            )
            assert third <= ledger.accepted and two <= ledger.accepted
            # us's router failed over to another region: nothing of phase 3 ran at home
            assert "sim-us" not in ledger.pools(third), ledger.pools(third)
            assert ledger.pools(third)["sim-ap"] > 0, ledger.pools(third)

            # 3. eu comes back: its queued work runs, everything ends once
            await cluster.node("eu").restart()
            buses["eu"] = await open_bus(cluster.url("eu"), name="client-eu", topology=topo)
            await start("worker-eu", "worker", "--pool", "sim-eu")
            await wait_until(lambda: all_ended(ledger.accepted), 90, "every chain to end")
            await sub.unsubscribe()
            report = await audit(
                buses["us"].js, ledger.accepted, topology=topo, scenario="region_cut"
            )
            assert report.ok, report.details()
            assert report.completed == len(ledger.accepted) == 2 * (10 + 20 + 10), report.line()
            for name, p in procs.items():  # no service stopped on the way
                assert p.returncode is None, (name, (tmp_path / f"{name}.log").read_text())
        finally:
            await kill_all(procs.values())
            for b in buses.values():
                with contextlib.suppress(Exception):
                    await b.close()
            await cluster.stop()
