"""One NATS connection with production defaults, and the topology it needs, created idempotently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import nats
from nats.aio.client import Client
from nats.errors import MaxPayloadError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from chainyard.contracts import ConsumerDef, KvDef, StreamDef, Subjects, Topology

from .consume import Durable

log = logging.getLogger("chainyard.nats")
T = TypeVar("T")
# "no suitable peers for placement": the meta leader does not count enough nodes as current to
# place the replicas. A cluster that has just formed answers it for a moment (the fault suite saw
# it in 2 of 40 fresh clusters), as does one short of a node: retry_api asks again.
NO_SUITABLE_PEERS = 10005
# A publish that no stream took (503: the stream has no leader) is sent again after this pause,
# doubling up to the max, until its timeout is spent.
NO_LEADER_PAUSE_S = 0.05
NO_LEADER_MAX_PAUSE_S = 0.5
JS_TIMEOUT_S = 10.0


def _fmt_url(url: str) -> str:
    """The URL without credentials, for logs."""
    if "@" in url:
        scheme, rest = url.split("://", 1) if "://" in url else ("nats", url)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


async def connect(
    url: str,
    *,
    name: str,
    creds: str | Path | None = None,
    max_reconnect_attempts: int = -1,
    inbox_prefix: str = "_INBOX",
    on_error: Callable[[Exception], None] | None = None,
) -> Client:
    """Connect like a long-running service should: reconnect forever, ping every 20 s, 3 missed
    make a reconnect. Credentials ride in the URL (`nats://user:pass@host`) or a creds file.
    `on_error`: told of each asynchronous error the server sends (a permissions violation)."""

    async def error_cb(e: Exception) -> None:
        log.warning("nats error: %s", e)
        if on_error is not None:
            on_error(e)

    return await nats.connect(
        url,
        name=name,
        user_credentials=str(creds) if creds else None,
        max_reconnect_attempts=max_reconnect_attempts,
        reconnect_time_wait=0.5,
        ping_interval=20,
        max_outstanding_pings=3,
        error_cb=error_cb,
        inbox_prefix=inbox_prefix,
    )


def stream_config(d: StreamDef, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=d.name,
        subjects=d.subjects,
        retention=RetentionPolicy.WORK_QUEUE
        if d.retention == "workqueue"
        else RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=d.max_age_s or None,
        duplicate_window=d.duplicate_window_s,
        max_msg_size=d.max_msg_size,
        max_bytes=d.max_bytes,
        num_replicas=replicas,
        allow_direct=d.allow_direct,
        allow_msg_schedules=d.allow_msg_schedules or None,
        allow_rollup_hdrs=d.allow_msg_schedules,  # the server requires it for schedules
        allow_msg_ttl=d.allow_msg_ttl or None,
    )


async def while_no_leader(call: Callable[[float], Awaitable[T]], timeout: float) -> T:
    """`call(seconds left)` (a JetStream publish, a KV write) again while no stream answers it
    (503: NoStreamResponseError), for up to `timeout` seconds, as nats.go does: nothing was
    stored, so it is safe (docs/DESIGN-NOTES.md #24)."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    pause = NO_LEADER_PAUSE_S
    while True:
        try:
            return await call(give_up - loop.time())
        except NoStreamResponseError:
            if loop.time() + pause >= give_up:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, NO_LEADER_MAX_PAUSE_S)


def fits(payload: bytes, headers: dict[str, str] | None, max_payload: int) -> None:
    """Raise MaxPayloadError, as nats-py does for a payload alone over the limit, when the
    payload and its headers together are: the server's answer to that is to close the
    connection (`Maximum Payload Violation`), and a service whose connection closes exits."""
    if not max_payload:
        return
    size = len(payload) + 12  # "NATS/1.0\r\n" and the blank line
    for k, v in (headers or {}).items():
        size += len(k) + len(v) + 4
    if size > max_payload:
        raise MaxPayloadError(f"{size} bytes with headers, over the server's {max_payload}")


@dataclass
class Publisher:
    """`js.publish` (its subject, payload, timeout and headers; its PubAck and errors), sent again
    while the stream has no leader (`while_no_leader`), refused when its headers take it over the
    server's limit (`fits`)."""

    js: JetStreamContext
    timeout: float = JS_TIMEOUT_S
    max_payload: int = 0  # the server's (0: unchecked); see `fits`

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        fits(payload, headers, self.max_payload)
        return await while_no_leader(
            lambda left: self.js.publish(subject, payload, timeout=left, headers=headers),
            self.timeout if timeout is None else timeout,
        )


@dataclass
class Bus:
    """The connection, JetStream and KV handles that a service works with."""

    nc: Client
    js: JetStreamContext
    topology: Topology
    chains: KeyValue
    capacity: KeyValue
    breakers: KeyValue
    publisher: Publisher = field(init=False, repr=False)  # waits out a leader election

    def __post_init__(self) -> None:
        self.publisher = Publisher(self.js, max_payload=self.nc.max_payload)

    @property
    def subjects(self) -> Subjects:
        return self.topology.subjects

    async def durable(self, stream: StreamDef, consumer: ConsumerDef) -> Durable:
        """Create or update the durable consumer (waiting out a leader election, as `retry_api`
        does); what `consume` takes messages from."""
        await retry_api(lambda: ensure_consumer(self.js, stream, consumer))
        return Durable(self.nc, stream.name, consumer.durable)

    async def close(self) -> None:
        """Drain the connection; one that cannot be drained (reconnecting, closed) is closed."""
        try:
            await self.nc.drain()
        except Exception:
            with contextlib.suppress(Exception):
                await self.nc.close()


async def ensure_stream(js: JetStreamContext, d: StreamDef, replicas: int) -> None:
    """Create the stream, or add subjects a newer version needs to an existing one.

    An existing stream's limits are the operator's (max bytes, age, replicas...): a service
    starting up never resets them. Its subjects, duplicate window, direct gets and message
    schedules are the design's."""
    cfg = stream_config(d, replicas)
    try:
        await js.add_stream(cfg)
    except BadRequestError as e:
        if e.err_code == NO_SUITABLE_PEERS:
            raise
        have = (await js.stream_info(d.name)).config
        missing = [s for s in cfg.subjects or [] if s not in (have.subjects or [])]
        # The duplicate window, direct gets, schedules and TTLs are part of the delivery design,
        # not limits: keep them ours. Schedules and TTLs are only turned on (the server refuses
        # them off).
        design = {"duplicate_window": cfg.duplicate_window, "allow_direct": cfg.allow_direct}
        if cfg.allow_msg_schedules:
            design |= {"allow_msg_schedules": True, "allow_rollup_hdrs": True}
        if cfg.allow_msg_ttl:
            design |= {"allow_msg_ttl": True}
        stale = {k: v for k, v in design.items() if (getattr(have, k) or False) != (v or False)}
        if missing or stale:
            have.subjects = [*(have.subjects or []), *missing]
            for k, v in stale.items():
                setattr(have, k, v)
            await js.update_stream(have)


async def ensure_consumer(js: JetStreamContext, stream: StreamDef, d: ConsumerDef) -> None:
    """Create the durable consumer, or bring an existing one to this version's settings.

    Servers since 2.10 update an existing durable on create; older ones refuse, so update.
    The settings are the delivery design (an old pool consumer's max_deliver of 5 would make
    the server drop poison work silently), so a refused update is logged, not hidden."""
    cfg = ConsumerConfig(
        durable_name=d.durable,
        filter_subject=d.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=d.ack_wait_s,
        max_deliver=d.max_deliver,
        max_ack_pending=d.max_ack_pending,
    )
    try:
        await js.add_consumer(stream.name, cfg)
    except BadRequestError:
        try:
            await js.update_consumer(stream.name, cfg)
        except BadRequestError as e:
            log.warning("consumer %s on %s keeps its old settings: %s", d.durable, stream.name, e)


async def ensure_kv(
    js: JetStreamContext, d: KvDef, replicas: int, max_bytes: int | None = None
) -> KeyValue:
    """The bucket, created with `d`'s settings unless it exists (an existing one keeps its own,
    but gets per-message TTLs when `d` asks for them: the server refuses turning them off)."""
    try:
        kv = await js.key_value(d.bucket)
    except (NotFoundError, BucketNotFoundError):
        cfg = KeyValueConfig(
            bucket=d.bucket, history=d.history, ttl=d.ttl_s or None, max_bytes=max_bytes,
            storage=StorageType.FILE, replicas=replicas,
        )  # fmt: skip
        try:
            kv = await js.create_key_value(cfg)
        except BadRequestError as e:
            if e.err_code == NO_SUITABLE_PEERS:
                raise
            kv = await js.key_value(d.bucket)  # another process created it first
    have = (await js.stream_info(f"KV_{d.bucket}")).config if d.allow_msg_ttl else None
    if have is not None and not have.allow_msg_ttl:
        have.allow_msg_ttl = True
        try:
            await js.update_stream(have)
        except BadRequestError as e:  # older than 2.11: the router then writes without TTLs
            log.warning("stream %s keeps entries without a TTL of their own: %s", have.name, e)
    return kv


async def open_bus(
    url: str,
    *,
    name: str,
    topology: Topology | None = None,
    creds: str | Path | None = None,
) -> Bus:
    """Connect and make sure every stream and bucket exists (safe from many processes at once)."""
    topology = topology or Topology()
    nc = await connect(url, name=name, creds=creds)
    js = nc.jetstream(timeout=JS_TIMEOUT_S)
    try:
        for s in topology.streams:
            await retry_api(lambda s=s: ensure_stream(js, s, topology.replicas))
        kvs = [
            await retry_api(lambda k=k: ensure_kv(js, k, topology.replicas))
            for k in topology.buckets
        ]
    except BaseException:
        # Nobody else holds this connection: left open, it would reconnect forever.
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    return Bus(nc=nc, js=js, topology=topology, chains=kvs[0], capacity=kvs[1], breakers=kvs[2])


async def retry_api(fn: Callable[[], Awaitable[T]], within_s: float = 60.0) -> T:
    """`fn` again, pausing 0.05 s doubling to 1 s, for up to `within_s` seconds, while the
    cluster elects its meta leader (a timeout, 503) or cannot place replicas yet: CI once saw a
    fresh cluster answer 503 for over 16 s, and a service starting then should wait, not exit."""
    give_up = time.monotonic() + within_s
    pause = 0.05
    while True:
        try:
            return await fn()
        except (NatsTimeoutError, ServiceUnavailableError, BadRequestError) as e:
            if isinstance(e, BadRequestError) and e.err_code != NO_SUITABLE_PEERS:
                raise
            left = give_up - time.monotonic()
            if left <= 0:
                raise
            if pause == 0.05:
                log.warning("JetStream unavailable (%s); retrying for up to %.0f s", e, left)
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)
