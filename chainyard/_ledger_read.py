"""The ledger's reading side: the event log, chain state and dead letters, read from NATS.

`collect()` reads the three sources into a `Snapshot` (stream CY_EVENTS, KV cy_chains, stream
CY_DLQ) and is the only part of the ledger that talks to NATS; the check of a snapshot
(ledger.py) is pure, data in, report out. Apart so that the check reads as the rules of
docs/RELIABILITY.md alone, and the I/O (ordered consumers, retries while a leader is elected,
stale replicas) stays here. Everything is importable from chainyard.ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from chainyard.contracts import ChainState, Event, Topology, event_decoder, state_decoder
from chainyard.runtime.nats import retry_api

Key = tuple[str, str]  # (tenant, chain id)


@dataclass(frozen=True)
class LoggedEvent:
    seq: int
    subject: str
    event: Event | None  # None: not decodable (itself unexpected)


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    subject: str
    tenant: str | None
    reason: str
    data: bytes
    chain: str | None = None  # Cy-Chain and Cy-Step: a work dead letter (a poison step)
    step: str | None = None


@dataclass
class Snapshot:
    events: list[LoggedEvent] = field(default_factory=list)
    states: dict[Key, ChainState] = field(default_factory=dict)  # by the KV key's (tenant, id)
    dead: list[DeadLetter] = field(default_factory=list)
    stale_reads: int = 0  # KV entries the consumer read older than the leader's


async def read_stream(
    js: JetStreamContext,
    stream: str,
    subject: str = ">",
    *,
    last_per_subject: bool = False,
    limit_s: float = 60.0,
) -> list[Msg]:
    """Every message stored in `stream` (optionally the last per subject), with an ordered
    consumer; ends when the consumer reports nothing pending. The API calls are retried while
    the cluster elects a leader (an audit right after a node loss)."""
    try:
        info = await retry_api(lambda: js.stream_info(stream))
    except NotFoundError:
        return []
    if info.state.messages == 0:
        return []
    out: list[Msg] = []
    done = asyncio.get_running_loop().create_future()

    async def cb(msg: Msg) -> None:
        out.append(msg)
        if msg.metadata.num_pending == 0 and not done.done():
            done.set_result(None)

    policy = DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL
    sub = await retry_api(
        lambda: js.subscribe(
            subject, cb=cb, ordered_consumer=True, deliver_policy=policy, stream=stream
        )
    )
    try:
        await asyncio.wait_for(done, limit_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


async def collect(js: JetStreamContext, topology: Topology | None = None) -> Snapshot:
    topology = topology or Topology()
    snap = Snapshot()
    for m in await read_stream(js, topology.events.name, topology.subjects.all_events):
        try:
            ev: Event | None = event_decoder.decode(m.data)
        except Exception:
            ev = None
        snap.events.append(LoggedEvent(m.metadata.sequence.stream, m.subject, ev))
    bucket = topology.chains_kv.bucket
    for m in await read_stream(js, f"KV_{bucket}", f"$KV.{bucket}.>", last_per_subject=True):
        if not m.data or (m.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            continue
        state = state_decoder.decode(m.data)
        if state.status == "running":
            # A consumer may be served by a replica that is still catching up (after a node
            # restart): confirm a running chain with a get through the stream leader.
            with contextlib.suppress(Exception):
                fresh = await js.get_msg(f"KV_{bucket}", subject=m.subject)
                if fresh.data:
                    again = state_decoder.decode(fresh.data)
                    if again != state:
                        snap.stale_reads += 1
                    state = again
        # The key as stored, not as the state claims: check() compares the two.
        tenant, _, chain_id = m.subject.removeprefix(f"$KV.{bucket}.").partition(".")
        snap.states[(tenant, chain_id)] = state
    for m in await read_stream(js, topology.dlq.name, topology.subjects.dlq):
        h = m.headers or {}
        snap.dead.append(
            DeadLetter(
                m.metadata.sequence.stream,
                m.subject,
                h.get("Cy-Tenant"),
                h.get("Cy-Reason", ""),
                m.data,
                h.get("Cy-Chain"),
                h.get("Cy-Step"),
            )
        )
    return snap
