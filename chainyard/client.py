"""The Python client: submit chains, watch their events, wait for the result.

A tenant's client needs only publish rights on its intake subject and subscribe rights on its
own event subjects: `run` subscribes before it submits, so it needs no JetStream API access.
`watch(..., history=True)` replays the chain's event log and needs read access to the stream.
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
from nats.js.api import DeliverPolicy
from nats.js.errors import NoKeysError

from chainyard.contracts import (
    Cancel,
    Chain,
    ChainCancelled,
    ChainCompleted,
    ChainEnded,
    ChainFailed,
    ChainRejected,
    Event,
    Replay,
    StepOverride,
    Subjects,
    Topology,
    encode,
    event_decoder,
    state_decoder,
)
from chainyard.contracts import new_id as _new_id
from chainyard.runtime import telemetry
from chainyard.runtime.nats import connect


class ChainStatusRow(msgspec.Struct, frozen=True, kw_only=True):
    chain_id: str
    steps: dict[str, str]  # running or waiting step -> its pool
    done: int
    total: int
    cost_usd: float
    age_s: float


ENDED = (ChainCompleted, ChainFailed, ChainCancelled, ChainRejected)
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ChainTimeout(TimeoutError):
    """No terminal event arrived in time; the chain may still be running."""


class Client:
    def __init__(self, nc: NatsClient, tenant: str, topology: Topology | None = None) -> None:
        self.nc = nc
        self.tenant = tenant
        self.topology = topology or Topology()
        self.subjects: Subjects = self.topology.subjects
        self.js = nc.jetstream()
        telemetry.use_global()  # the application's OTel provider, if it set one up

    @classmethod
    async def connect(
        cls, url: str, tenant: str, *, creds: str | Path | None = None, prefix: str = "cy"
    ) -> Client:
        # Replies (PubAcks) come to a tenant's own inbox prefix, which NATS permissions can pin
        # so no tenant reads another's replies (deploy/accounts.conf).
        nc = await connect(
            url,
            name=f"chainyard-client-{tenant}",
            creds=creds,
            max_reconnect_attempts=10,
            inbox_prefix=f"_INBOX_{tenant}",
        )
        return cls(nc, tenant, Topology(subjects=Subjects(prefix=prefix)))

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

        The chain id is the `Nats-Msg-Id`, so submitting the same chain twice is accepted once.
        """
        data, chain_id = _prepare(chain)
        await telemetry.publish(self.js, self.subjects.submit(self.tenant), data, chain_id)
        return chain_id

    async def run(self, chain: Chain | bytes, timeout: float = 300.0) -> ChainEnded:
        """Submit and wait for the chain's terminal event."""
        data, chain_id = _prepare(chain)
        publish = telemetry.publish(self.js, self.subjects.submit(self.tenant), data, chain_id)
        return await self._await_end(chain_id, publish, timeout)

    async def _await_end(
        self, chain_id: str, action: Awaitable[object], timeout: float
    ) -> ChainEnded:
        """Subscribe to the chain's events, then perform `action`, then wait for the end.

        When the stream says the publish was a duplicate (the same chain id was submitted
        before), the chain's own event log answers: the first run's terminal event.
        """
        ended: asyncio.Future[ChainEnded] = asyncio.get_running_loop().create_future()

        async def on_event(msg: Msg) -> None:
            with contextlib.suppress(Exception):
                ev = event_decoder.decode(msg.data)
                if isinstance(ev, ENDED) and not ended.done():
                    ended.set_result(ev)

        sub = await self.nc.subscribe(
            self.subjects.chain_events(self.tenant, chain_id), cb=on_event
        )
        try:
            ack = await action
            if getattr(ack, "duplicate", False):
                return await asyncio.wait_for(self._last_event(chain_id), timeout)
            try:
                return await asyncio.wait_for(ended, timeout)
            except TimeoutError:
                raise ChainTimeout(f"chain {chain_id!r} did not end within {timeout} s") from None
        finally:
            await sub.unsubscribe()

    async def cancel(self, chain_id: str, reason: str = "cancelled by the client") -> None:
        """Ask the router to cancel a chain; it ends with a `chain.cancelled` event, in-flight
        steps are dropped at the workers. A chain that already ended gets `control.rejected`."""
        await self._control(chain_id, "cancel", encode(Cancel(reason=reason)))

    async def signal(self, chain_id: str, name: str, data: object = None) -> None:
        """Release the chain's wait steps for signal `name`; `data` (JSON) is their output."""
        await self._control(chain_id, f"signal.{name}", msgspec.json.encode(data))

    async def replay(
        self,
        chain_id: str,
        from_step: str,
        overrides: dict[str, StepOverride] | None = None,
        *,
        new_id: str | None = None,
        wait: float | None = None,
    ) -> str | ChainEnded:
        """Re-run an ended chain from `from_step` as a new chain (linked by `replay_of`);
        earlier outputs are reused. Returns the new id, or with `wait`, its terminal event."""
        req = Replay(new_id=new_id or _new_id(), from_step=from_step, overrides=overrides or {})
        if wait is None:
            await self._control(chain_id, "replay", encode(req))
            return req.new_id
        return await self._await_end(
            req.new_id, self._control(chain_id, "replay", encode(req)), wait
        )

    async def status(self) -> list[ChainStatusRow]:
        """This tenant's chains in flight: running steps, their pools, cost so far.

        Reads the chain-state bucket, so it needs read access to KV `cy_chains` (an operator's
        or the tenant's own key prefix)."""
        kv = await self.js.key_value(self.topology.chains_kv.bucket)
        try:
            keys = [k for k in await kv.keys() if k.startswith(f"{self.tenant}.")]
        except NoKeysError:
            return []
        rows = []
        for key in keys:
            entry = await kv.get(key)
            if not entry.value:
                continue
            state = state_decoder.decode(entry.value)
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

    async def _last_event(self, chain_id: str) -> ChainEnded:
        async for ev in self.watch(chain_id, history=True):
            if isinstance(ev, ENDED):
                return ev
        raise AssertionError("unreachable: watch ends only on a terminal event")

    async def _control(self, chain_id: str, verb: str, data: bytes) -> None:
        subject = self.subjects.control(self.tenant, chain_id, verb)
        await telemetry.publish(self.js, subject, data, f"{chain_id}.{verb}.{_new_id()}")

    async def watch(
        self, chain_id: str, *, history: bool = True, deltas: bool = False
    ) -> AsyncIterator[Event | tuple[str, str]]:
        """Events of one chain until it ends; with `deltas`, also (step_id, text) token deltas."""
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def put(msg: Msg) -> None:
            queue.put_nowait(msg)

        subject = self.subjects.chain_events(self.tenant, chain_id)
        subs = []
        if history:
            subs.append(
                await self.js.subscribe(
                    subject, cb=put, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
                )
            )
        else:
            subs.append(await self.nc.subscribe(subject, cb=put))
        if deltas:
            subs.append(
                await self.nc.subscribe(self.subjects.delta(self.tenant, chain_id, "*"), cb=put)
            )
        try:
            while True:
                msg = await queue.get()
                if msg.subject.startswith(f"{self.subjects.prefix}.delta."):
                    yield (msg.subject.rsplit(".", 1)[-1], msg.data.decode(errors="replace"))
                    continue
                ev = event_decoder.decode(msg.data)
                yield ev
                if isinstance(ev, ENDED):
                    return
        finally:
            for s in subs:
                with contextlib.suppress(Exception):
                    await s.unsubscribe()


class _IdOnly(msgspec.Struct):
    id: str = ""


_id_decoder = msgspec.json.Decoder(_IdOnly)


def _prepare(chain: Chain | bytes) -> tuple[bytes, str]:
    """The bytes to send and the id to send them under.

    Raw bytes keep their own `id` when they have a usable one; otherwise (even when they are not
    JSON at all) a fresh id goes in `Nats-Msg-Id`, and the intake's rejection carries it back.
    """
    if isinstance(chain, Chain):
        return encode(chain), chain.id
    try:
        claimed = _id_decoder.decode(chain).id
    except (msgspec.DecodeError, msgspec.ValidationError):
        claimed = ""
    return chain, claimed if _ID.match(claimed) else _new_id()
