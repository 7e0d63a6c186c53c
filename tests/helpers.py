"""Test helpers: wait on events (never sleep), run services, read streams, find processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from chainyard.contracts import (
    ChainCompleted,
    ChainFailed,
    ChainRejected,
    ConsumerDef,
    Event,
    StreamDef,
    Topology,
    event_decoder,
)
from chainyard.ledger import read_stream
from chainyard.runtime.nats import Bus

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

ENDED = (ChainCompleted, ChainFailed, ChainRejected)


class Events:
    """A core subscription, set up before the action, that keeps every event it receives.

    `await ev.wait(predicate, timeout)` returns the first received event (old or new) that
    matches, so an event that arrives between the action and the wait is never missed.
    """

    def __init__(self, nc: NatsClient, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self.received: list[tuple[str, Event]] = []
        self._changed = asyncio.Condition()
        self._sub: Any = None

    async def _on(self, msg: Msg) -> None:
        try:
            ev = event_decoder.decode(msg.data)
        except Exception:  # not an event (e.g. a delta): ignore
            return
        async with self._changed:
            self.received.append((msg.subject, ev))
            self._changed.notify_all()

    async def __aenter__(self) -> Events:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on)
        await self.nc.flush()  # the server has the interest before the caller acts
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    def matching(self, predicate: Callable[[Event], bool]) -> list[Event]:
        return [ev for _, ev in self.received if predicate(ev)]

    async def wait(
        self, predicate: Callable[[Event], bool], timeout: float = 10.0, count: int = 1
    ) -> Event:
        """The `count`-th matching event; TimeoutError (with what was seen) if it does not come."""

        async def seen() -> Event:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.matching(predicate)) >= count)
                return self.matching(predicate)[count - 1]

        try:
            return await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            kinds = [f"{s}: {type(e).__name__}" for s, e in self.received]
            raise TimeoutError(
                f"no matching event on {self.subject} in {timeout} s; saw {kinds}"
            ) from None

    async def ended(
        self, chain_id: str, timeout: float = 10.0
    ) -> ChainCompleted | ChainFailed | ChainRejected:
        ev = await self.wait(lambda e: isinstance(e, ENDED) and e.chain_id == chain_id, timeout)
        assert isinstance(ev, ENDED)
        return ev


async def wait_for_event(
    nc: NatsClient,
    subject: str,
    predicate: Callable[[Event], bool],
    timeout: float,
    action: Callable[[], Awaitable[Any]] | None = None,
) -> Event:
    """Subscribe, then perform `action`, then wait for the first matching event."""
    async with Events(nc, subject) as ev:
        if action is not None:
            await action()
        return await ev.wait(predicate, timeout)


async def wait_until(
    check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll a condition (sync or async) with a short interval until it holds or the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(*services: Any, timeout: float = 15.0) -> AsyncIterator[asyncio.Event]:
    """Run services (Router, Worker: anything with `run(stop)`) as tasks; stop and join them."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in services]
    try:
        yield stop
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        assert not pending, f"{len(pending)} service(s) did not stop within {timeout} s"


async def pull(
    bus: Bus, stream: StreamDef, consumer: ConsumerDef
) -> JetStreamContext.PullSubscription:
    """The durable consumer, created or updated, bound to a pull subscription to fetch from."""
    await bus.durable(stream, consumer)
    return await bus.js.pull_subscribe_bind(durable=consumer.durable, stream=stream.name)


async def stream_count(js: JetStreamContext, stream: str, subject: str) -> int:
    info = await js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def work_queue_empty(js: JetStreamContext, topology: Topology | None = None) -> bool:
    topology = topology or Topology()
    info = await js.stream_info(topology.work.name)
    return info.state.messages == 0


async def stream_messages_eventually(
    js: JetStreamContext, stream: str, subject: str, count: int, timeout: float = 10.0
) -> list[Msg]:
    """Wait until `stream` holds at least `count` messages on `subject`, then return them all.

    For effects that follow the event a test waits on (the router publishes the rejection
    first, then stores the offending message in the DLQ).
    """

    async def enough() -> bool:
        return await stream_count(js, stream, subject) >= count

    await wait_until(enough, timeout, f"{count} message(s) on {subject} in {stream}")
    return await stream_messages(js, stream, subject)


async def stream_messages(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message stored in `stream` on `subject` (wildcards allowed), oldest first. Counted
    first: the ledger's reader waits for a message on the subject, and there may be none."""
    if await stream_count(js, stream, subject) == 0:
        return []
    return await read_stream(js, stream, subject, limit_s=10.0)


async def stream_events(
    js: JetStreamContext, subject: str, stream: str = "CY_EVENTS"
) -> list[Event]:
    return [event_decoder.decode(m.data) for m in await stream_messages(js, stream, subject)]


async def stored_events(
    js: JetStreamContext, subject: str, count: int, stream: str = "CY_EVENTS"
) -> list[Event]:
    """The events on `subject` once the stream holds at least `count` of them."""
    msgs = await stream_messages_eventually(js, stream, subject, count)
    return [event_decoder.decode(m.data) for m in msgs]


async def chain_log(
    js: JetStreamContext, tenant: str, chain_id: str, prefix: str = "cy"
) -> list[Event]:
    """The chain's events from CY_EVENTS, once its terminal event is stored there.

    A core subscriber can see an event a moment before the stream has stored it, so wait for
    the stream itself; every step event of the chain precedes the terminal one.
    """
    base = f"{prefix}.events.{tenant}.{chain_id}"
    stream = f"{prefix.upper()}_EVENTS"

    async def ended() -> bool:
        return await stream_count(js, stream, f"{base}.chain.*") >= 1

    await wait_until(ended, 10.0, f"the terminal event of {chain_id} in {stream}")
    return await stream_events(js, f"{base}.>", stream)


async def kv_keys(js: Any, bucket: str) -> set[str]:
    """The keys of KV `bucket` that have a message in its stream (a deleted key's marker too),
    from the stream's subjects: nats-py's `kv.keys()` may return none while it has some, when
    its watch's end-of-history marker overtakes the entries (seen once under CI load)."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    return {s.removeprefix(prefix) for s in info.state.subjects or {}}


async def heartbeats_from(kv: Any, pools: Iterable[str]) -> bool:
    """Whether each of `pools` has a worker's heartbeat in the capacity bucket `kv` (False while
    the bucket is empty or cannot be read)."""
    try:
        keys = await kv.keys()
    except Exception:  # NoKeysError: none yet
        return False
    return all(any(k.startswith(f"{p}.") for k in keys) for p in pools)


async def heartbeat_seen(kv: Any, pool: str, timeout: float = 10.0) -> None:
    """Wait until some worker of `pool` has a heartbeat in the capacity bucket."""

    async def first() -> None:
        watcher = await kv.watch(f"{pool}.>")
        try:
            async for entry in watcher:
                if entry is not None and entry.value:
                    return
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    await asyncio.wait_for(first(), timeout)


# -- processes -------------------------------------------------------------------------------


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live direct children of `pid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "<pid> (<comm>) <state> <ppid> ...": comm may contain spaces, so split at the last ')'
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append((int(entry.name), comm))
    return out


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_cli(log: Path, *args: str) -> asyncio.subprocess.Process:
    """`python -m chainyard.cli ARGS` as a separate process, its output in `log`."""
    out = log.open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainyard.cli", *args,
            stdout=out, stderr=asyncio.subprocess.STDOUT, env=python_env(),
        )  # fmt: skip
    finally:
        out.close()


async def stop_all(procs: Iterable[asyncio.subprocess.Process], grace_s: float = 15) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL past `grace_s`)."""
    procs = list(procs)
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), grace_s)
        except TimeoutError:
            p.kill()
            await p.wait()


async def start_routers(
    log_dir: Path, nats_url: str, config: Path, n: int = 2
) -> list[asyncio.subprocess.Process]:
    """`n` `chainyard router` processes (replicas, as deployed), logs in log_dir/router{i}.log."""
    args = ("router", "--nats", nats_url, "--config", str(config))
    return [await start_cli(log_dir / f"router{i}.log", *args) for i in range(n)]


async def kill_all(procs: Iterable[asyncio.subprocess.Process]) -> None:
    """SIGKILL every process still running and reap it: a test's teardown that has nothing
    to drain (what the processes did is already checked)."""
    for p in procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()


def free_ports(n: int) -> list[int]:
    """n distinct free ports (a port handed back by the kernel may come again: skip repeats)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
        if p not in out:
            out.append(p)
    return out


def free_port() -> int:
    return free_ports(1)[0]


# -- spans -----------------------------------------------------------------------------------


@contextlib.contextmanager
def recorded_spans(
    *, chain_ids: bool = True, sampler: Any = None
) -> Iterator[InMemorySpanExporter]:
    """This process's spans, kept in memory through an SDK provider (with `chain_ids`, as
    `tracing.setup` builds it: trace ids from chain ids; `sampler`: the SDK's default when
    None); tracing is off again after."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from chainyard.runtime import tracing

    exporter = InMemorySpanExporter()
    if chain_ids:
        provider = TracerProvider(
            resource=Resource.create({}), id_generator=tracing.ChainIds(), sampler=sampler
        )
    else:
        provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider, capture=False)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def names(items: Sequence[Any]) -> list[str]:
    return [type(i).__name__ for i in items]
