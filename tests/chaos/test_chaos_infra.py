"""Infrastructure faults under load: NATS restarts, a 3-node cluster losing its leaders, cut
connections, outages longer than a client's reconnect budget, providers that fail or throttle,
and streams that are full. Each runs two router replicas and three workers, with two tenants
submitting the same chain ids, and ends with the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from chaosharness import (
    ROOT,
    SHORT,
    TENANTS,
    Ledger,
    Load,
    Procs,
    Stack,
    expected_output,
    heartbeat,
    pairs,
    progress,
    scale,
    wait_all_ended,
    wait_count,
    write_config,
)
from helpers import free_ports, pull, work_queue_empty
from helpers import running as run_services
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, Placement, StreamConfig
from nats.js.errors import APIError
from worker_support import POOL, HeldCalls, assignment

from chainyard.client import Client
from chainyard.contracts import (
    Topology,
    encode,
    load_config,
)
from chainyard.runtime.nats import connect, open_bus, retry_api, stream_config
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.workers.runtime import Worker


async def _kill_server(server: NatsServer) -> None:
    server.signal(signal.SIGKILL)


async def test_nats_restart_under_load(stack: Stack, ledger: Ledger) -> None:
    """SIGKILL nats-server twice while 10,000 steps (short: 1,000) are in flight; restart it on
    the same port and store. Services reconnect and nothing is lost or done twice."""
    s = stack
    s.load.give_up_s = 120
    await s.deploy()
    n = scale(1250, 125)  # ids, each used by both tenants; four steps a chain
    load = asyncio.create_task(s.load.run(pairs("nr", n)))
    restarts = 0
    for k in range(2):
        await progress(s.bus.js, (k + 1) * 2 * n // 4, 300)
        await _kill_server(s.server)
        await s.server.restart()
        restarts += 1
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 600)
    s.procs.assert_alive()
    await s.audit(ledger, notes={"restarts": restarts})


async def test_nats_stalled_briefly(stack: Stack, ledger: Ledger) -> None:
    """The server freezes (SIGSTOP) for 5 s with calls in flight: no TCP error reaches anyone,
    acks wait, ack timers run out; after SIGCONT everything resumes."""
    s = stack
    await s.deploy()
    n = scale(150, 50)
    load = asyncio.create_task(s.load.run(pairs("st", n)))
    await progress(s.bus.js, 2 * n // 4, 60)
    s.server.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(5.0)  # the fault's duration, not a wait for a result
    finally:
        s.server.signal(signal.SIGCONT)
    await load
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    s.procs.assert_alive()
    await s.audit(ledger)


class BlackHoleProxy:
    """A TCP proxy in front of NATS. `black_hole()` makes the current connections half-open:
    the server side is closed, the client side stays open and silent, so the client can only
    notice through missing PONGs. New connections are proxied normally."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.accepted = 0
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bool]]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> BlackHoleProxy:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def _on_client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.accepted += 1
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        holed = [False]
        self._pairs.append((cw, sw, holed))

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if holed[0]:
                        continue  # swallowed: the black hole
                    w.write(data)
                    await w.drain()

        for t in (asyncio.create_task(pipe(cr, sw)), asyncio.create_task(pipe(sr, cw))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def black_hole(self) -> None:
        for _, sw, holed in self._pairs:
            holed[0] = True
            sw.close()  # the server sees the client leave; the client sees nothing

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for cw, sw, _ in self._pairs:
            cw.close()
            sw.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.mark.skipif(SHORT, reason="needs ~80 s of ping timeout; full run only")
async def test_half_open_connection_noticed_by_pings(stack: Stack, ledger: Ledger) -> None:
    """A worker's connection goes half-open (a proxy drops it silently). The server redelivers
    its steps to the other worker after the ack wait; the worker notices only by missing pings
    (20 s x 3), reconnects, and its late results change nothing."""
    s = stack
    proxy = await BlackHoleProxy(s.server.port).start()
    try:
        await s.sandbox.configure(latency_ms=200)
        await s.deploy(workers=2)  # sim and sim2; the third worker goes through the proxy
        await s.procs.worker(url=proxy.url)
        n = 100
        load = asyncio.create_task(s.load.run(pairs("ho", n)))
        await progress(s.bus.js, 2 * n // 5, 60)
        proxy.black_hole()
        other = await s.procs.worker()
        await load
        await wait_all_ended(s.bus.js, s.load.accepted, 120)
        # the half-open worker comes back through the proxy once its pings went unanswered
        await wait_count(lambda: proxy.accepted >= 2, 150, "the cut worker to reconnect")
        s.procs.assert_alive()
        await s.load.run(pairs("ho2", 25))
        await wait_all_ended(s.bus.js, s.load.accepted, 60)
        assert other.running
        await s.audit(ledger, notes={"reconnects": proxy.accepted - 1})
    finally:
        await proxy.close()


async def test_nats_down_longer_than_client_reconnect_budget(stack: Stack, ledger: Ledger) -> None:
    """NATS is down until the tenant's client gave up (closed connection); the services, which
    reconnect forever, carry on; the client connects again and resubmits under the same ids."""
    s = stack
    await s.deploy()
    clients = {t: await Client.connect(s.server.url, t) for t in TENANTS}
    chains = pairs("dn", scale(100, 40))
    accepted: set[tuple[str, str]] = set()
    try:
        for t, c in chains[: len(chains) // 2]:
            await clients[t].submit(c)
            accepted.add((t, c.id))
        s.server.signal(signal.SIGKILL)
        for client in clients.values():
            await wait_count(
                lambda c=client: c.nc.is_closed, 120, "the clients to give up reconnecting"
            )
        with pytest.raises(Exception):  # noqa: B017 - the closed connection's own error type
            await clients["ta"].submit(chains[-1][1])
    finally:
        for client in clients.values():
            await client.close()
    await s.server.restart()
    for t in TENANTS:
        async with await Client.connect(s.server.url, t) as again:
            for tenant, c in chains:  # resubmit everything: the same chains are accepted once
                if tenant == t:
                    await again.submit(c)
                    accepted.add((t, c.id))
    await wait_all_ended(s.bus.js, accepted, 120)
    s.procs.assert_alive()
    outputs = {(t, c.id): expected_output(c) or "" for t, c in chains}
    await ledger.audit(s.bus, accepted, outputs=outputs)


@pytest.mark.chaos_config(max_attempts=3)
async def test_provider_fails_forever(stack: Stack, ledger: Ledger) -> None:
    """Every call gets a 503: each step fails after max_attempts with the reason, every chain
    ends failed, and the work queue empties."""
    s = stack
    await s.sandbox.configure(dark=True)
    await s.deploy()
    await s.load.run(pairs("dark", scale(50, 20)))
    n = len(s.load.accepted)
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    await wait_count(lambda: work_queue_empty(s.bus.js, s.topology), 30, "an empty work queue")
    calls = s.sandbox.counts["openai.chat"]
    # only the first step of each chain runs: it fails, so the chain does
    assert calls <= 3 * n, f"{calls} calls for {n} first steps of at most 3 attempts"
    r = await s.audit(ledger, expect="failed", notes={"calls": calls})
    assert r.failed == n


@pytest.mark.chaos_config(max_attempts=5)
async def test_provider_429_retry_after_honoured(stack: Stack, ledger: Ledger) -> None:
    """Every call in a 3 s window gets a 429 with retry-after 1 s: steps wait and complete; the
    provider sees a bounded number of requests, not a hot loop."""
    s = stack
    await s.deploy()
    await s.sandbox.configure(rate_limit_for_s=3.0, retry_after_s=1.0)
    t0 = time.monotonic()
    await s.load.run(pairs("rl", scale(30, 15)))
    await wait_all_ended(s.bus.js, s.load.accepted, 120)
    calls = s.sandbox.counts["openai.chat"]
    r = await s.audit(ledger, notes={"calls": calls, "secs": round(time.monotonic() - t0, 1)})
    # each step: at most one 429 per retry-after second of the window, then one success
    assert calls <= r.steps * 5, f"{calls} calls for {r.steps} steps: retry-after not honoured"


@pytest.mark.chaos_config(slots=2)
async def test_full_streams_refuse_explicitly(stack: Stack, ledger: Ledger) -> None:
    """Intake and work streams with a message limit and discard=new: a publisher past the limit
    gets an explicit error; what was accepted is all processed once the pressure goes."""
    s = stack
    js = s.bus.js
    await s.sandbox.configure(latency_ms=1000)  # 2 slots x 1 s: the work queue backs up
    routers = (await s.deploy()).routers
    await wait_count(
        lambda: _has_consumer(js, s.topology.intake.name), 30, "the router's intake consumer"
    )
    # Limits set by the operator after the services started: a service that starts later
    # re-applies the topology's own stream config (ensure_stream), see docs/RELIABILITY.md.
    for name, limit in ((s.topology.intake.name, 20), (s.topology.work.name, 10)):
        cfg = (await js.stream_info(name)).config
        cfg.max_msgs = limit
        cfg.discard = DiscardPolicy.NEW
        await js.update_stream(cfg)
    for r in routers:
        r.signal(signal.SIGSTOP)  # the routers stall: the intake fills up
    refused: list[str] = []
    try:
        for t, c in pairs("full", 20):
            try:
                await js.publish(s.topology.subjects.submit(t), encode(c))
                s.load.accepted.add((t, c.id))
                s.load.outputs[(t, c.id)] = expected_output(c) or ""
            except APIError as e:
                refused.append(str(e))
    finally:
        for r in routers:
            r.signal(signal.SIGCONT)
    assert len(s.load.accepted) == 20 and len(refused) == 20, refused[:3]
    assert all("maximum messages" in r for r in refused), refused[:3]
    # 20 chains, a work stream of 10 and a slow worker: dispatch is refused and retried
    await wait_count(
        lambda: _stream_msgs(js, s.topology.work.name, 10), 30, "the work stream to fill up"
    )
    await wait_all_ended(js, s.load.accepted, 120)
    logs = "".join(r.log.read_text() for r in routers)
    assert "maximum messages" in logs, "no router ever hit the full stream"
    s.procs.assert_alive()
    await s.audit(ledger, notes={"refused": len(refused)})


async def _has_consumer(js: object, stream: str) -> bool:
    info = await js.stream_info(stream)  # type: ignore[attr-defined]
    return bool(info.state.consumer_count >= 1)


async def _stream_msgs(js: object, stream: str, n: int) -> bool:
    info = await js.stream_info(stream)  # type: ignore[attr-defined]
    return bool(info.state.messages >= n)


# -- a 3-node cluster --------------------------------------------------------------------------


class Cluster:
    """Three nats-server nodes with JetStream, routes on free ports, deploy/cluster.conf, each
    tagged `node:<name>` (a test can pin an R1 stream to a node). Node logs: <base>/<name>.log."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.names = ["n1", "n2", "n3"]
        ports = free_ports(2 * len(self.names))
        self.cluster_ports, self.http_ports = ports[:3], ports[3:]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.cluster_ports)
        deploy = (ROOT / "deploy" / "cluster.conf").read_text()
        self.nodes = []
        for i, name in enumerate(self.names):
            conf = base / f"{name}.conf"
            conf.write_text(f'{deploy}\nserver_tags: ["node:{name}"]\n')
            self.nodes.append(
                NatsServer(
                    config_file=conf,
                    store_dir=base / name,
                    log_file=base / f"{name}.log",
                    extra_args=[
                        "--name",
                        name,
                        "--cluster_name",
                        "cy",
                        "--cluster",
                        f"nats://127.0.0.1:{self.cluster_ports[i]}",
                        "--routes",
                        routes,
                        "-m",
                        str(self.http_ports[i]),
                    ],
                )
            )

    async def start(self) -> None:
        """Start the nodes, then wait until every one follows the same meta leader: before
        that, JetStream answers 503 or not at all."""
        await asyncio.gather(*(n.start() for n in self.nodes))
        try:
            await wait_count(self._formed, 120, "the three nodes to agree on a meta leader", 0.1)
        except TimeoutError as e:
            tails = "\n".join(f"--- {n}:\n{self.node(n).log_tail}" for n in self.names)
            raise TimeoutError(f"{e}\n{tails}") from e

    async def _formed(self) -> bool:
        leaders = {await self._leader_seen_by(name) for name in self.names}
        return len(leaders) == 1 and None not in leaders

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)

    def node(self, name: str) -> NatsServer:
        return self.nodes[self.names.index(name)]

    def jsz(self, name: str, query: str = "") -> dict[str, Any]:
        port = self.http_ports[self.names.index(name)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/jsz{query}", timeout=2) as r:
            return json.loads(r.read())

    async def caught_up(self, streams: list[str]) -> bool:
        """Every node holds the same last sequence of each of `streams`: a node that came back
        has caught up (a reader may be served by any replica)."""
        last: dict[str, set[int]] = {s: set() for s in streams}
        for name in self.names:
            try:
                z = await asyncio.to_thread(self.jsz, name, "?streams=true")
            except Exception:
                return False
            for acc in z.get("account_details") or []:
                for sd in acc.get("stream_detail") or []:
                    if sd["name"] in last:
                        last[sd["name"]].add(sd["state"]["last_seq"])
        return all(len(seqs) == 1 for seqs in last.values())

    async def meta_leader(self) -> str | None:
        """The meta leader as the first running node that knows one sees it."""
        for name in self.names:
            if self.node(name).pid is not None and (leader := await self._leader_seen_by(name)):
                return leader
        return None

    async def _leader_seen_by(self, name: str) -> str | None:
        try:
            z = await asyncio.to_thread(self.jsz, name)
        except Exception:
            return None
        return (z.get("meta_cluster") or {}).get("leader")  # type: ignore[union-attr,return-value]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    try:
        await c.start()
        yield c
    finally:
        await c.stop()


async def _leader_of(js: object, which: str, topology: object) -> str | None:
    t = topology
    try:
        if which == "stream":
            info = await js.stream_info(t.work.name)  # type: ignore[attr-defined]
        else:
            info = await js.consumer_info(t.work.name, t.pool_consumer("sim").durable)  # type: ignore[attr-defined]
    except Exception:
        return None
    return info.cluster.leader if info.cluster else None


# The scenario's named waits add up to less than this: one of them, not pytest's timeout, ends a
# stuck run and says what it waited for (pytest's timeout stops the loop without the finally).
CLUSTER_TIMEOUT_S = 900


@pytest.mark.timeout(CLUSTER_TIMEOUT_S)
@pytest.mark.parametrize("leader", ["stream", "consumer", "meta"])
async def test_cluster_leader_killed(
    cluster: Cluster, tmp_path: Path, ledger: Ledger, leader: str
) -> None:
    """Replicas 3; under load, SIGKILL the node leading the work stream / the pool's consumer /
    the JetStream meta group, wait for a new leader, bring the node back. Nothing lost. The
    users' deployment: two routers, three workers over two pools, two tenants sharing ids."""
    async with SandboxServer(SandboxConfig(capture=0)) as sandbox:
        cfg = write_config(tmp_path / "chainyard.toml", sandbox.url, replicas=3, pools=2)
        topology = load_config(cfg).topology
        logs = tmp_path / "logs"  # with the nodes' logs in tmp_path/cluster
        logs.mkdir()
        procs = Procs(cluster.nodes[0].url, cfg, logs)
        bus = None
        try:
            # everything connects to one node and learns the others from it
            bus = await open_bus(cluster.nodes[0].url, name="chaos-test", topology=topology)
            for _ in range(2):
                await procs.router()
            for pool in ("sim", "sim2", "sim"):
                await procs.worker(pool)
            await heartbeat(bus.nc, "sim", limit_s=60)
            await heartbeat(bus.nc, "sim2", limit_s=60)
            load = Load(bus.js, topology=topology, give_up_s=120)
            n = scale(150, 50)  # ids, each used by both tenants: 300 (100) chains of 4 steps
            running = asyncio.create_task(load.run(pairs("cl", n)))
            await progress(bus.js, n // 2, 120)
            if leader == "meta":
                victim = await wait_count(cluster.meta_leader, 30, "a meta leader")
            else:
                victim = await wait_count(
                    lambda: _leader_of(bus.js, leader, topology), 30, "a leader"
                )
            cluster.node(victim).signal(signal.SIGKILL)

            async def moved() -> bool:
                if leader == "meta":
                    now = await cluster.meta_leader()
                else:
                    now = await _leader_of(bus.js, leader, topology)
                return now is not None and now != victim

            await wait_count(moved, 60, f"a new {leader} leader", interval=0.2)
            await cluster.node(victim).restart()
            try:  # each submit gives up after 120 s (then it is not in `accepted`)
                await asyncio.wait_for(running, 150)
            except TimeoutError:
                raise AssertionError("the load's submits still unanswered after 150 s") from None
            notes: dict[str, object] = {"victim": victim, "publish_retries": load.publish_errors}
            if missing := await wait_all_ended(bus.js, load.accepted, 120):
                notes["waited_for"] = f"{len(missing)} chains to end, 120 s"
                notes["consumers"] = await _consumers_state(bus.js, topology)
            read = [topology.events.name, f"KV_{topology.chains_kv.bucket}", topology.dlq.name]
            await wait_count(
                lambda: cluster.caught_up(read), 60, f"the three nodes to hold the same {read}"
            )
            procs.assert_alive()
            await ledger.audit(
                bus,
                load.accepted,
                name=f"cluster_{leader}_leader_killed",
                notes=notes,
                outputs=load.outputs,
            )
        finally:
            await procs.close()
            if bus is not None:
                await bus.close()


async def _consumers_state(js: JetStreamContext, topology: Topology) -> str:
    """What each consumer holds: a message left in a stream that its consumer neither has
    pending nor awaits an ack for will never be delivered again (its max_deliver is spent)."""
    t = topology
    out = []
    for stream, consumer in (
        (t.work, t.pool_consumer("sim")),
        (t.events, t.engine_consumer),
        (t.intake, t.intake_consumer),
        (t.timers, t.timers_consumer),
    ):
        try:
            si = await js.stream_info(stream.name)
            ci = await js.consumer_info(stream.name, consumer.durable)
            out.append(
                f"{stream.name}/{consumer.durable}: stored={si.state.messages} "
                f"pending={ci.num_pending} ack_pending={ci.num_ack_pending} "
                f"redelivered={ci.num_redelivered} waiting={ci.num_waiting}"
            )
        except Exception as e:
            out.append(f"{stream.name}/{consumer.durable}: {e!r}")
    return "; ".join(out)


async def test_cluster_event_stream_without_leader_costs_no_delivery(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A worker finishes a step while the event stream has no leader (its node is down for
    6 s): the result is published when the stream is back, the work message is delivered once
    and the provider called once. Before, each 503 failed the handler, the nak's redelivery
    (0.25 s doubling) called the provider again, and after 5 deliveries in ~4 s the message was
    never delivered again: the chain hung (test_cluster_leader_killed[stream], make chaos). With
    the worker's own poison bound (no server max_deliver) it would instead fail the step as
    having "crashed or hung its worker": an election must cost no delivery."""
    topology = Topology(replicas=1)
    # Everything on n1, the services' node, except the event stream on n3: killing n3 takes
    # the event stream's only replica (it cannot move), and nothing else.
    await _place_r1(cluster, topology, on_n3=topology.events.name)
    bus = await open_bus(cluster.nodes[0].url, name="worker", topology=topology)
    execute = HeldCalls()
    worker = Worker(bus, POOL, execute, slots=4)
    a = assignment("c1")
    n3 = cluster.node("n3")
    try:
        async with run_services(worker):
            await bus.publisher.publish(
                topology.subjects.work(POOL), encode(a), headers={"Nats-Msg-Id": a.msg_id}
            )
            await asyncio.wait_for(execute.entered.wait(), 10)
            n3.signal(signal.SIGKILL)
            await wait_count(
                lambda: _route_gone(cluster, "n1", "n3"), 10, "n1 to lose its route to n3"
            )
            execute.release.set()  # the result goes to a stream that has no leader now
            await asyncio.sleep(6.0)  # the outage's duration, not a wait for a result
            await n3.restart()
            subject = topology.subjects.event("acme", "c1", "step.completed")
            got = await wait_count(
                lambda: _stored(bus.js, topology.events.name, subject),
                15,
                "the step's result in the event stream",
            )
            info = await bus.js.consumer_info(
                topology.work.name, topology.pool_consumer(POOL).durable
            )
            calls = execute.calls
            assert (got, calls, info.num_redelivered, info.delivered.consumer_seq) == (1, 1, 0, 1)
            await wait_count(
                lambda: work_queue_empty(bus.js, topology), 10, "the work message to be acked"
            )
    finally:
        await bus.close()


async def test_cluster_chain_state_without_leader_still_runs_a_redelivered_step(
    cluster: Cluster,
) -> None:
    """A redelivered step first reads its chain's state (is its result recorded already?).
    While the chain-state bucket has no leader (its only node is down) that read fails: it
    counts as "not recorded" and the step runs. Before, every delivery failed on the read and
    was nak'ed (a delivery each, 6 in 15 s), and the provider was never called."""
    topology = Topology(replicas=1)
    bucket = f"KV_{topology.chains_kv.bucket}"
    await _place_r1(cluster, topology, on_n3=bucket)
    bus = await open_bus(cluster.nodes[0].url, name="worker", topology=topology)
    execute = HeldCalls(held=False)
    a = assignment("c1")
    consumer = topology.pool_consumer(POOL)
    try:
        await bus.publisher.publish(
            topology.subjects.work(POOL), encode(a), headers={"Nats-Msg-Id": a.msg_id}
        )
        # A first delivery that ends without a result, as a crashed worker's does.
        sub = await pull(bus, topology.work, consumer)
        [first] = await sub.fetch(1, timeout=10)
        await first.nak()
        await sub.unsubscribe()
        cluster.node("n3").signal(signal.SIGKILL)
        await wait_count(lambda: _route_gone(cluster, "n1", "n3"), 10, "n1 to lose n3")

        async def meta_leader_alive() -> bool:  # the worker's consumer create needs one
            return await cluster.meta_leader() in ("n1", "n2")

        await wait_count(meta_leader_alive, 30, "a meta leader on n1 or n2", interval=0.2)
        async with run_services(Worker(bus, POOL, execute, slots=4)):
            subject = topology.subjects.event("acme", "c1", "step.completed")
            await wait_count(
                lambda: _stored(bus.js, topology.events.name, subject), 15, "the step's result"
            )
            await wait_count(
                lambda: work_queue_empty(bus.js, topology), 10, "the work message to be acked"
            )
        info = await bus.js.consumer_info(topology.work.name, consumer.durable)
        assert (execute.calls, info.delivered.consumer_seq) == (1, 2)
        failed = topology.subjects.event("acme", "c1", "step.failed")
        assert await _stored(bus.js, topology.events.name, failed) == 0
    finally:
        await bus.close()


async def _place_r1(cluster: Cluster, topology: Topology, on_n3: str) -> None:
    """Every stream and bucket with one replica on n1 (the services' node) but `on_n3` (a
    stream's name, KV_<bucket> for a bucket) on n3: killing n3 takes that one's only replica
    (it cannot move), and nothing else."""
    nc = await connect(cluster.nodes[0].url, name="setup")
    js = nc.jetstream()

    def tags(name: str) -> Placement:
        return Placement(tags=["node:n3" if name == on_n3 else "node:n1"])

    try:
        for d in topology.streams:
            cfg = stream_config(d, 1)
            cfg.placement = tags(d.name)
            await retry_api(lambda cfg=cfg: js.add_stream(cfg))
        for k in topology.buckets:
            # A bucket's stream as nats-py's create_key_value makes it, which ignores placement.
            kv = StreamConfig(
                name=f"KV_{k.bucket}",
                subjects=[f"$KV.{k.bucket}.>"],
                allow_direct=True,
                allow_rollup_hdrs=True,
                deny_delete=True,
                discard=DiscardPolicy.NEW,
                max_msgs_per_subject=k.history,
                max_age=k.ttl_s or None,
                num_replicas=1,
                placement=tags(f"KV_{k.bucket}"),
            )
            await retry_api(lambda kv=kv: js.add_stream(kv))
            assert (await js.stream_info(kv.name)).cluster.leader == kv.placement.tags[0][5:]
    finally:
        await nc.close()


def _route_gone(cluster: Cluster, on: str, to: str) -> bool:
    port = cluster.http_ports[cluster.names.index(on)]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/routez", timeout=2) as r:
        routes = json.loads(r.read()).get("routes") or []
    return all(x.get("remote_name") != to for x in routes)


async def _stored(js: JetStreamContext, stream: str, subject: str) -> int:
    try:
        info = await js.stream_info(stream, subjects_filter=subject)
    except Exception:
        return 0
    return sum((info.state.subjects or {}).values())
