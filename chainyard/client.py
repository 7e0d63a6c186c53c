"""The Python client: submit chains, watch their events, wait for the result.

A tenant's client needs only publish rights on its intake subject and subscribe rights on its
own event subjects: `run` subscribes before it submits, so it needs no JetStream API access.
`watch(..., history=True)` and `status()` read through consumers whose create request names the
tenant's own subjects, which deploy/accounts.conf allows a tenant and nothing wider.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from types import TracebackType

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from chainyard.contracts import (
    BadMessage,
    Cancel,
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainEnded,
    ChainFailed,
    ChainRejected,
    ChainTimeout,
    ChainyardError,
    ControlAccepted,
    ControlRejected,
    Event,
    LlmStep,
    Replay,
    StepCompleted,
    StepOverride,
    Subjects,
    Topology,
    chain_decoder,
    chain_digest,
    encode,
    event_decoder,
    state_decoder,
)
from chainyard.contracts import new_id as _new_id
from chainyard.ordered import OrderedReader
from chainyard.refusals import PermissionDenied, Refusals
from chainyard.runtime import messaging, tracing
from chainyard.runtime.nats import connect


class ChainStatusRow(msgspec.Struct, frozen=True, kw_only=True):
    chain_id: str
    steps: dict[str, str]  # running or waiting step -> its pool
    done: int
    total: int
    cost_usd: float
    age_s: float


ENDED = (ChainCompleted, ChainFailed, ChainCancelled, ChainRejected)
ControlAnswer = ControlAccepted | ControlRejected
CONTROL_TIMEOUT_S = 30.0  # a router answers at once; an unknown chain after ~6 s
_TERMINAL_KINDS = ("chain.completed", "chain.failed", "chain.cancelled")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Client:
    """`refusals`: the connection's permission refusals (`Refusals.saw` as its error callback,
    as `connect` sets up), so a call the NATS user may not make raises `PermissionDenied` at
    once instead of waiting out its timeout."""

    def __init__(
        self,
        nc: NatsClient,
        tenant: str,
        topology: Topology | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        self.nc = nc
        self.tenant = tenant
        self.topology = topology or Topology()
        self.refusals = refusals or Refusals()
        self.subjects: Subjects = self.topology.subjects
        self.js = nc.jetstream()
        tracing.use_global()  # the application's OTel provider, if it set one up

    @classmethod
    async def connect(
        cls, url: str, tenant: str, *, creds: str | Path | None = None, prefix: str = "cy"
    ) -> Client:
        # Replies (PubAcks) come to a tenant's own inbox prefix, which NATS permissions can pin
        # so no tenant reads another's replies (deploy/accounts.conf).
        refusals = Refusals()
        nc = await connect(
            url,
            name=f"chainyard-client-{tenant}",
            creds=creds,
            max_reconnect_attempts=10,
            inbox_prefix=f"_INBOX_{tenant}",
            on_error=refusals.saw,
        )
        return cls(nc, tenant, Topology(subjects=Subjects(prefix=prefix)), refusals)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def submit(self, chain: Chain | bytes) -> str:
        """Publish a chain (or raw JSON bytes) to the intake; returns the chain id once stored.

        A chain id is taken once per tenant: the same chain submitted again is not run again,
        and a different chain under a used id gets `chain.rejected` (`id_in_use`)."""
        data, chain_id, _, msg_id = _prepare(chain)
        subject = self.subjects.submit(self.tenant)
        with self.refusals.watching((subject,)):
            await messaging.publish(self.js, subject, data, msg_id)
        return chain_id

    async def run(
        self, chain: Chain | bytes, timeout: float = 300.0, *, fresh_id: bool = False
    ) -> ChainEnded:
        """Submit and wait for the chain's terminal event, or its rejection.

        Submitted again, the same chain answers with its first run's end; a different chain
        under a used id answers with its own `chain.rejected`, never the other chain's end.
        `fresh_id`: the id was made for this call (`new_id()`), so no earlier run of it can
        have ended, and the event log is not searched for one (three fewer round trips)."""
        data, chain_id, digest, msg_id = _prepare(chain)
        subject = self.subjects.submit(self.tenant)
        publish = messaging.publish(self.js, subject, data, msg_id)
        ended = await self._await_end(
            chain_id, subject, publish, timeout, digest, look_back=not fresh_id
        )
        assert not isinstance(ended, StepCompleted)  # only `answer_of` takes a step's event
        return ended

    async def answer(self, chain: Chain, timeout: float = 300.0) -> StepCompleted | ChainEnded:
        """Submit a one-step chain and return its step's answer the moment it is stored.

        The answer is the step's `step.completed` event, as the worker published it: the
        router records the chain's end from that same event (`chain.completed`, with the same
        output, usage and cost, about a millisecond later), so the caller need not wait for
        it. A step that does not answer ends the chain: then its end (failed, cancelled,
        rejected) is returned, as from `run`.

        The chain's id must be made for this call (`new_id()`): an answer is known by its
        chain id and step alone, so an earlier chain under the same id could answer instead.
        Use `run` for a chain id that may have run before."""
        if len(chain.steps) != 1 or (
            isinstance(chain.steps[0], LlmStep) and chain.steps[0].loop is not None
        ):
            raise ValueError("answer() takes a chain of one step (not an agent loop); use run()")
        # (a Chain's own id is not a message id, and no digest is compared: see `_prepare`)
        subject = self.subjects.submit(self.tenant)
        publish = messaging.publish(self.js, subject, encode(chain), "")
        return await self._await_end(
            chain.id, subject, publish, timeout, look_back=False, answer_of=chain.steps[0].id
        )

    async def _await_end(
        self,
        chain_id: str,
        publishes: str,
        action: Awaitable[object],
        timeout: float,
        digest: str | None = None,
        *,
        look_back: bool = True,
        answer_of: str | None = None,
    ) -> StepCompleted | ChainEnded:
        """Subscribe to the chain's events, then perform `action` (a publish to the intake
        stream, on subject `publishes`), then wait for the end that answers it.

        Which end answers: a `chain.rejected` of this very message (its `intake_seq` is the
        publish ack's sequence), or a chain's end whose `digest` is this chain's. The end of an
        earlier run of the same chain is looked up in the event log, since it will not come
        again; an earlier, different chain's end is not an answer. `answer_of`: the
        `step.completed` of this step answers too (`answer`)."""
        ended: asyncio.Future[StepCompleted | ChainEnded] = (
            asyncio.get_running_loop().create_future()
        )
        seq: list[int] = []  # the intake sequence, once the publish is acknowledged
        early: list[ChainRejected] = []  # rejections seen before the ack

        def offer(ev: Event) -> None:
            if ended.done():
                return
            if isinstance(ev, ChainRejected):
                if not seq:
                    early.append(ev)
                elif ev.intake_seq in (seq[0], 0):  # 0: a router older than intake_seq
                    ended.set_result(ev)
            elif isinstance(ev, ENDED) and (digest is None or ev.digest in (digest, "")):
                ended.set_result(ev)
            elif isinstance(ev, StepCompleted) and ev.step_id == answer_of:
                ended.set_result(ev)

        async def on_event(msg: Msg) -> None:
            with contextlib.suppress(*BadMessage):
                offer(event_decoder.decode(msg.data))

        events = self.subjects.chain_events(self.tenant, chain_id)
        with self.refusals.watching((events, publishes)):
            sub = await self.nc.subscribe(events, cb=on_event)
            try:
                ack = await action
                seq.append(getattr(ack, "seq", 0) or 0)
                for ev in early:
                    offer(ev)
                if digest is not None and look_back:
                    for ev in await self._ends_before(chain_id):
                        offer(ev)
                try:
                    async with asyncio.timeout(timeout):  # (no task and waiter, as wait_for has)
                        return await ended
                except TimeoutError:
                    raise ChainTimeout(
                        f"chain {chain_id!r} did not end within {timeout} s"
                    ) from None
            finally:
                with contextlib.suppress(Exception):  # the connection may be closing
                    await sub.unsubscribe()

    async def _ends_before(self, chain_id: str) -> list[Event]:
        """The chain's terminal events already in the event log (direct gets by subject, which
        a tenant's permissions allow on its own subjects only)."""
        stream = self.topology.events.name

        async def last(kind: str) -> Event | None:
            subject = self.subjects.event(self.tenant, chain_id, kind)
            try:
                raw = await self.js.get_last_msg(stream, subject, direct=True)
                return event_decoder.decode(raw.data or b"")
            except Exception:  # not there, no permission, a stream without direct gets
                return None

        got = await asyncio.gather(*(last(k) for k in _TERMINAL_KINDS))
        return [ev for ev in got if ev is not None]

    async def cancel(
        self,
        chain_id: str,
        reason: str = "cancelled by the client",
        *,
        timeout: float | None = CONTROL_TIMEOUT_S,
    ) -> ControlAnswer | None:
        """Ask the router to cancel a chain: it ends with `chain.cancelled`, its in-flight steps
        are dropped at the workers. Returns the router's answer: `ControlAccepted` once the
        cancel is recorded (the `chain.cancelled` is then in the chain's events), or
        `ControlRejected` with the reason (the chain already ended, no such chain).
        `timeout=None` only sends it (returns None); no answer in time raises `ChainTimeout`."""
        return await self._control(chain_id, "cancel", encode(Cancel(reason=reason)), timeout)

    async def signal(
        self,
        chain_id: str,
        name: str,
        data: object = None,
        *,
        timeout: float | None = CONTROL_TIMEOUT_S,
    ) -> ControlAnswer | None:
        """Release the chain's wait steps for signal `name`; `data` (JSON) is their output.
        Returns the router's answer, as `cancel` does (`message` says what the signal did)."""
        return await self._control(chain_id, f"signal.{name}", msgspec.json.encode(data), timeout)

    async def replay(
        self,
        chain_id: str,
        from_step: str,
        overrides: dict[str, StepOverride] | None = None,
        *,
        new_id: str | None = None,
        wait: float | None = None,
        timeout: float = CONTROL_TIMEOUT_S,
    ) -> str | ChainEnded | ControlRejected:
        """Re-run an ended chain from `from_step` as a new chain (linked by `replay_of`);
        earlier outputs are reused. Returns the new id once the router has accepted it, or with
        `wait`, the new chain's terminal event; a replay that cannot apply (the chain is
        running or unknown, no such step) returns the router's `ControlRejected` at once.
        No answer within `timeout` raises `ChainTimeout`."""
        req = Replay(new_id=new_id or _new_id(), from_step=from_step, overrides=overrides or {})
        data = encode(req)
        if wait is None:
            answer, _ = await self._request(chain_id, "replay", data, timeout)
            return answer if isinstance(answer, ControlRejected) else req.new_id

        async def request() -> object:
            answer, ack = await self._request(chain_id, "replay", data, timeout)
            if isinstance(answer, ControlRejected):
                raise _Refused(answer)
            return ack

        control = self.subjects.control(self.tenant, chain_id, "replay")
        try:  # the new chain's events are subscribed to before the request goes out
            return await self._await_end(req.new_id, control, request(), wait)
        except _Refused as r:
            return r.answer

    async def status(self, timeout: float = 30.0) -> list[ChainStatusRow]:
        """This tenant's chains in flight: running steps, their pools, cost so far.

        Reads the latest state of each of the tenant's keys in KV `cy_chains` through a consumer
        filtered on `$KV.cy_chains.<tenant>.>`, which a tenant's permissions allow (listing the
        whole bucket's keys, or its stream info, they do not)."""
        latest: dict[str, bytes] = {}
        done = asyncio.Event()

        async def keep(msg: Msg) -> None:
            latest[msg.subject] = msg.data  # a later revision of a key replaces the earlier
            if msg.metadata.num_pending == 0:
                done.set()

        bucket = self.topology.chains_kv.bucket
        reader = OrderedReader(
            self.nc, self.js, f"KV_{bucket}", f"$KV.{bucket}.{self.tenant}.>", keep
        )
        try:
            if await reader.start(DeliverPolicy.LAST_PER_SUBJECT):
                await asyncio.wait_for(done.wait(), timeout)
        finally:
            await reader.stop()
        rows = []
        for value in latest.values():
            if not value:  # a deleted or purged key
                continue
            state = state_decoder.decode(value)
            if state.status != "running":
                continue
            active = {
                sid: st.target.pool if st.target else "-"
                for sid, st in state.steps.items()
                if st.status in ("dispatched", "waiting")
            }
            rows.append(
                ChainStatusRow(
                    chain_id=state.chain.id,
                    steps=active,
                    done=sum(st.status == "completed" for st in state.steps.values()),
                    total=len(state.steps),
                    cost_usd=state.cost_usd,
                    age_s=(time.time() * 1000 - state.created_at_ms) / 1000,
                )
            )
        return sorted(rows, key=lambda r: -r.age_s)

    async def _control(
        self, chain_id: str, verb: str, data: bytes, timeout: float | None
    ) -> ControlAnswer | None:
        if timeout is None:
            subject = self.subjects.control(self.tenant, chain_id, verb)
            with self.refusals.watching((subject,)):
                await messaging.publish(self.js, subject, data, "")
            return None
        answer, _ = await self._request(chain_id, verb, data, timeout)
        return answer

    async def _request(
        self, chain_id: str, verb: str, data: bytes, timeout: float
    ) -> tuple[ControlAnswer, object]:
        """Publish a control message and wait for the router's answer to it (and its ack):
        the `control.accepted` or `control.rejected` whose `intake_seq` is the publish ack's."""
        answered: asyncio.Future[ControlAnswer] = asyncio.get_running_loop().create_future()
        seq: list[int] = []
        early: list[ControlAnswer] = []  # answers seen before the ack

        def offer(ev: ControlAnswer) -> None:
            if answered.done():
                return
            if not seq:
                early.append(ev)
            elif ev.intake_seq in (seq[0], 0):  # 0: a router older than intake_seq
                answered.set_result(ev)

        async def on_event(msg: Msg) -> None:
            with contextlib.suppress(*BadMessage):
                ev = event_decoder.decode(msg.data)
                if isinstance(ev, ControlAccepted | ControlRejected):
                    offer(ev)

        answers = self.subjects.event(self.tenant, chain_id, "control.*")
        subject = self.subjects.control(self.tenant, chain_id, verb)
        with self.refusals.watching((answers, subject)):
            sub = await self.nc.subscribe(answers, cb=on_event)
            try:
                ack = await messaging.publish(self.js, subject, data, "")
                seq.append(getattr(ack, "seq", 0) or 0)
                for ev in early:
                    offer(ev)
                try:
                    return await asyncio.wait_for(answered, timeout), ack
                except TimeoutError:
                    raise ChainTimeout(
                        f"no answer from a router to {verb} of chain {chain_id!r} (tenant "
                        f"{self.tenant!r}) within {timeout:g} s: is a router running on this "
                        "NATS?"
                    ) from None
            finally:
                with contextlib.suppress(Exception):  # the connection may be closing
                    await sub.unsubscribe()

    async def exists(self, chain_id: str) -> bool:
        """Whether the tenant has a chain of this id: its state, or any event of it.

        Reads through consumers filtered on the chain's own subjects, which a tenant's
        permissions allow (like `status` and `watch`)."""
        bucket = self.topology.chains_kv.bucket
        for stream, subject in (
            (f"KV_{bucket}", f"$KV.{bucket}.{self.tenant}.{chain_id}"),
            (self.topology.events.name, self.subjects.chain_events(self.tenant, chain_id)),
        ):
            reader = OrderedReader(self.nc, self.js, stream, subject, _ignore)
            try:
                if await reader.start(DeliverPolicy.LAST_PER_SUBJECT):
                    return True
            finally:
                await reader.stop()
        return False

    async def watch(
        self,
        chain_id: str,
        *,
        history: bool = True,
        deltas: bool = False,
        missing_after: float | None = None,
    ) -> AsyncIterator[Event | tuple[str, str]]:
        """Events of one chain until it ends; with `deltas`, also (step_id, text) token deltas.

        With `missing_after` (and `history`), a chain that has no state and no event yet and
        shows none within that many seconds raises `NoSuchChain` (a mistyped id or tenant)."""
        queue: asyncio.Queue[Msg | PermissionDenied] = asyncio.Queue()

        async def put(msg: Msg) -> None:
            queue.put_nowait(msg)

        subject = self.subjects.chain_events(self.tenant, chain_id)
        delta = self.subjects.delta(self.tenant, chain_id, "*")
        refused = self.refusals.listening((subject, delta), queue.put_nowait)
        subs: list[Subscription | OrderedReader] = []
        unknown = False
        refused.open()
        try:
            if history:
                reader = OrderedReader(self.nc, self.js, self.topology.events.name, subject, put)
                subs.append(reader)
                stored = await reader.start(DeliverPolicy.ALL)
                unknown = (
                    missing_after is not None and not stored and not await self.exists(chain_id)
                )
            else:
                subs.append(await self.nc.subscribe(subject, cb=put))
            if deltas:
                subs.append(await self.nc.subscribe(delta, cb=put))
            while True:
                if unknown:  # nothing yet: it may have been submitted a moment ago
                    try:
                        msg = await asyncio.wait_for(queue.get(), missing_after)
                    except TimeoutError:
                        if await self.exists(chain_id):  # created, no event yet
                            unknown = False
                            continue
                        raise NoSuchChain(
                            f"no chain {chain_id!r} for tenant {self.tenant!r}: no state and "
                            f"no events after {missing_after:g} s"
                        ) from None
                    unknown = False
                else:
                    msg = await queue.get()
                if isinstance(msg, PermissionDenied):
                    raise msg
                if msg.subject.startswith(f"{self.subjects.prefix}.delta."):
                    yield (msg.subject.rsplit(".", 1)[-1], msg.data.decode(errors="replace"))
                    continue
                ev = event_decoder.decode(msg.data)
                yield ev
                if isinstance(ev, ENDED) and not (isinstance(ev, ChainRejected) and ev.id_in_use):
                    return  # (a clash of a later submission with this chain does not end it)
        finally:
            refused.close()
            for s in subs:
                with contextlib.suppress(Exception):
                    await (s.stop() if isinstance(s, OrderedReader) else s.unsubscribe())


class NoSuchChain(ChainyardError, LookupError):
    """The tenant has no chain of that id: no state and no event (`Client.watch`)."""


class _Refused(Exception):
    """A control request the router rejected (inside `replay`, to stop waiting for the end)."""

    def __init__(self, answer: ControlRejected) -> None:
        super().__init__(answer.message)
        self.answer = answer


async def _ignore(msg: Msg) -> None:
    pass


def _with_id(data: bytes) -> bytes:
    """A chain (JSON object) without an `id` gets a fresh one; anything else is left as is,
    for the router to judge."""
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data
    if isinstance(value, dict) and "id" not in value:
        return msgspec.json.encode({"id": _new_id(), **value})
    return data


def _prepare(chain: Chain | bytes) -> tuple[bytes, str, str, str]:
    """The bytes to send, the chain id, their digest, and the `Nats-Msg-Id` to send.

    Raw bytes keep their own `id` when they are a chain the router can decode (its rejection,
    if any, then comes on that id's subjects); a JSON object without an id gets a fresh one;
    otherwise (not JSON, not a valid chain) a fresh id goes in `Nats-Msg-Id`, which the
    router's rejection carries back.
    A chain's own id is never a message id: the intake stream's ids are not per tenant, the
    router's dedup is."""
    data = encode(chain) if isinstance(chain, Chain) else chain
    if isinstance(chain, Chain):
        return data, chain.id, chain_digest(data), ""
    data = _with_id(data)
    try:
        claimed = chain_decoder.decode(data).id  # only a chain the router can read keeps its id
    except BadMessage:
        claimed = ""
    if _ID.match(claimed):
        return data, claimed, chain_digest(data), ""
    fresh = _new_id()
    return data, fresh, chain_digest(data), fresh
