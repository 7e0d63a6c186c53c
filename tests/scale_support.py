"""Helpers of the scaling and region tests: a two-step chain, a delaying TCP proxy
(the kernel here has no netem), and a 3-node NATS cluster with one node per region whose routes
and cross-region client links go through such proxies."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from pathlib import Path
from typing import Any

from helpers import free_ports, wait_until

from chainyard.contracts import Chain, LlmStep, Message
from chainyard.runtime.server import NatsServer

ROOT = Path(__file__).resolve().parent.parent


def two_step_chain(tenant: str, cid: str) -> Chain:
    """a -> b, b's prompt refers to a's output; the tenant is in the text, so a chain that got
    another tenant's output (same id) would have the wrong answer."""
    a = Message(role="user", content=f"{tenant} {cid}")
    b = Message(role="user", content="{{steps.a.output}}")
    return Chain(
        id=cid,
        steps=[LlmStep(id="a", model="m", messages=[a]), LlmStep(id="b", model="m", messages=[b])],
    )


class DelayProxy:
    """Forwards TCP connections to `target`, each chunk in each direction `delay_s` late (order
    kept): a link between regions. `cut()` drops every connection and refuses new ones."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the node behind is down: so is the link
            writer.close()
            return
        self._writers |= {writer, up_writer}
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)  # the link's latency itself
                if not data:
                    break
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay_s, data))
            queue.put_nowait((loop.time() + self.delay_s, b""))
            await sender
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            writer.close()

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class RegionCluster:
    """One nats-server per region (deploy/cluster.conf: JetStream, sync always), tagged
    `region:<name>`. Node i's route port is reached by the others only through a DelayProxy,
    which is also what it advertises to them; its client port is advertised to clients through
    another (so a client that fails over to a node of another region pays the latency), while
    the region's own services connect to it directly."""

    def __init__(self, base: Path, regions: list[str], delay_s: float) -> None:
        self.regions = regions
        n = len(regions)
        ports = free_ports(3 * n)
        self.client_ports, self.route_ports, self.http_ports = (ports[i::3] for i in range(3))
        self.route_proxies = [DelayProxy(p, delay_s) for p in self.route_ports]
        self.client_proxies = [DelayProxy(p, delay_s) for p in self.client_ports]
        self.base = base
        self.nodes: list[NatsServer] = []

    async def start(self) -> None:
        for px in (*self.route_proxies, *self.client_proxies):
            await px.start()
        deploy = (ROOT / "deploy" / "cluster.conf").read_text()
        self.base.mkdir(parents=True, exist_ok=True)
        for i, region in enumerate(self.regions):
            conf = self.base / f"{region}.conf"
            conf.write_text(f'{deploy}\nserver_tags: ["region:{region}"]\n')
            others = [f"nats://{px.address}" for j, px in enumerate(self.route_proxies) if j != i]
            args = [
                "--name", region, "--cluster_name", "cy",
                "--cluster", f"nats://127.0.0.1:{self.route_ports[i]}",
                "--cluster_advertise", self.route_proxies[i].address,
                "--client_advertise", self.client_proxies[i].address,
                "--routes", ",".join(others),
                "-m", str(self.http_ports[i]),
            ]  # fmt: skip
            self.nodes.append(
                NatsServer(
                    config_file=conf,
                    store_dir=self.base / region,
                    log_file=self.base / f"{region}.log",
                    port=self.client_ports[i],
                    extra_args=args,
                )
            )
        await asyncio.gather(*(n.start() for n in self.nodes))
        await wait_until(self.formed, 90, "the nodes to agree on a JetStream meta leader", 0.2)

    def url(self, region: str) -> str:
        return self.node(region).url

    def node(self, region: str) -> NatsServer:
        return self.nodes[self.regions.index(region)]

    def jsz(self, region: str) -> dict[str, Any]:
        port = self.http_ports[self.regions.index(region)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/jsz", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    async def formed(self, regions: list[str] | None = None) -> bool:
        """Every node of `regions` (default: all) sees the same meta leader, one of them."""
        regions = regions or self.regions
        seen = set()
        for r in regions:
            try:
                z = await asyncio.to_thread(self.jsz, r)
            except OSError:
                return False
            seen.add((z.get("meta_cluster") or {}).get("leader"))
        return len(seen) == 1 and seen <= set(regions)

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)
        for px in (*self.route_proxies, *self.client_proxies):
            await px.close()
