"""The router service: intake -> chain state -> assignments; step events -> next steps.

Delivery discipline (DESIGN.md, NATS-NOTES.md): every state change is a compare-and-set on the
chain's KV revision; effects (assignments, chain events) go out after the change is recorded,
with deterministic message ids; the incoming message is acked last. A crash anywhere in between
redelivers the message, and the redelivery finds the change recorded and repeats only effects
that the streams then deduplicate.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from chainyard.contracts import (
    Assignment,
    ChainRejected,
    ChainState,
    Config,
    DecodeError,
    Event,
    FieldError,
    StepCompleted,
    StepFailed,
    ValidationError,
    chain_decoder,
    encode,
    new_id,
    state_decoder,
    step_event_decoder,
)
from chainyard.runtime.consume import consume
from chainyard.runtime.nats import Bus

from . import chains, graph
from .capacity import CapacityView
from .catalog import Catalog
from .policy import Policy

log = logging.getLogger("chainyard.router")
_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _msgspec_path(e: Exception) -> tuple[str, str]:
    """Split msgspec's "... - at `$.steps[0].model`" into (path, message)."""
    text = str(e)
    if " - at `" in text:
        message, _, path = text.rpartition(" - at `")
        return path.rstrip("`"), message
    return "$", text


class Router:
    def __init__(self, bus: Bus, config: Config, *, concurrency: int = 256) -> None:
        self.bus = bus
        self.config = config
        self.subjects = bus.topology.subjects
        self.capacity = CapacityView(bus.capacity)
        self.catalog = Catalog(config, self.capacity.seen)
        self.policy = Policy(self.catalog, self.capacity)
        self.concurrency = concurrency
        self.kv: KeyValue = bus.chains

    async def run(self, stop: asyncio.Event) -> None:
        await self.capacity.start()
        topo = self.bus.topology
        intake = await self.bus.pull(topo.intake, topo.intake_consumer)
        events = await self.bus.pull(topo.events, topo.engine_consumer)
        try:
            await asyncio.gather(
                consume(intake, self.on_submit, stop, self.concurrency, name="intake"),
                consume(events, self.on_step_event, stop, self.concurrency, name="engine"),
            )
        finally:
            await self.capacity.stop()

    # -- intake ----------------------------------------------------------------------------

    async def on_submit(self, msg: Msg) -> None:
        tenant = self.subjects.tenant_of_submit(msg.subject)
        try:
            chain = chain_decoder.decode(msg.data)
        except (DecodeError, ValidationError) as e:
            path, message = _msgspec_path(e)
            await self._reject(msg, tenant, self._claimed_id(msg), [FieldError(path=path, message=message)])
            return
        errors = [FieldError(path=e.path, message=e.message) for e in graph.validate(chain)]
        errors += [FieldError(path=p, message=m) for p, m in self.catalog.problems(chain)]
        if errors:
            await self._reject(msg, tenant, chain.id, errors)
            return
        key = f"{tenant}.{chain.id}"
        outcome = chains.start(chain, tenant, now_ms(), self.policy.pick)
        try:
            await self.kv.create(key, encode(outcome.state))
        except KeyWrongLastSequenceError:
            existing, _ = await self._load(key)
            if existing is None or existing.chain != chain:
                await self._reject(msg, tenant, chain.id, [FieldError(
                    path="$.id", message=f"chain id {chain.id!r} is already used by another chain"
                )])
                return
            # The same chain again: accepted once. Re-perform the first dispatch (deduplicated)
            # in case the earlier attempt crashed before it.
            outcome = chains.Outcome(
                state=existing,
                dispatch=[s for s, st in existing.steps.items() if st.status == "dispatched" and st.attempt == 1 and not graph.dependencies(existing.chain.step(s))],
                ended=chains.ended_event(existing),
            )
        await self._perform(outcome)
        await msg.ack()

    def _claimed_id(self, msg: Msg) -> str:
        claimed = (msg.headers or {}).get("Nats-Msg-Id", "")
        return claimed if _ID_OK.match(claimed) else f"rejected-{new_id()}"

    async def _reject(self, msg: Msg, tenant: str, chain_id: str, errors: list[FieldError]) -> None:
        ev = ChainRejected(chain_id=chain_id, tenant=tenant, errors=errors)
        log.info("rejected chain %s/%s: %s", tenant, chain_id, "; ".join(f"{e.path}: {e.message}" for e in errors))
        await self._publish_event(ev, f"{chain_id}.rejected.{msg.metadata.sequence.stream}")
        # Keep the offending message itself for operators (bad input is never dropped silently).
        await self.bus.js.publish(
            self.subjects.dlq_subject("intake"),
            msg.data,
            headers={"Cy-Tenant": tenant, "Cy-Reason": "; ".join(e.message for e in errors)[:1000]},
        )
        await msg.term()

    # -- step events -------------------------------------------------------------------------

    async def on_step_event(self, msg: Msg) -> None:
        try:
            ev = step_event_decoder.decode(msg.data)
        except (DecodeError, ValidationError) as e:
            log.warning("poison step event on %s: %s", msg.subject, e)
            await self.bus.js.publish(
                self.subjects.dlq_subject("events"), msg.data, headers={"Cy-Reason": str(e)[:1000]}
            )
            await msg.term()
            return
        key = f"{ev.tenant}.{ev.chain_id}"
        while True:
            state, rev = await self._load(key)
            if state is None:
                log.warning("event for unknown chain %s", key)
                await msg.term()
                return
            st = state.steps.get(ev.step_id)
            current = (
                state.status == "running"
                and st is not None
                and st.status == "dispatched"
                and st.attempt == ev.attempt
            )
            if not current:
                # Duplicate or late (a zombie worker, a lost hedge): change nothing, but make
                # sure what the recorded transition caused did go out.
                await self._perform(chains.followups(state, ev.step_id, ev.attempt))
                await msg.ack()
                return
            outcome = self._transition(state, ev, msg)
            if outcome.retry_after_s is not None:
                await msg.nak(delay=outcome.retry_after_s)
                return
            try:
                await self.kv.update(key, encode(outcome.state), last=rev)
            except KeyWrongLastSequenceError:
                continue  # another event of this chain won: read again and re-decide
            break
        await self._perform(outcome)
        await msg.ack()

    def _transition(self, state: ChainState, ev: StepCompleted | StepFailed, msg: Msg) -> chains.Outcome:
        t = now_ms()
        if isinstance(ev, StepCompleted):
            return chains.on_completed(state, ev, t, self.policy.pick)
        published_ms = msg.metadata.timestamp.timestamp() * 1000 if msg.metadata.timestamp else t
        due = ev.error.retry_after_s is None or t >= published_ms + ev.error.retry_after_s * 1000
        return chains.on_failed(state, ev, t, self.policy.pick, self.config.max_attempts, due)

    # -- effects -----------------------------------------------------------------------------

    async def _load(self, key: str) -> tuple[ChainState | None, int]:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, 0
        if entry.value is None:
            return None, 0
        return state_decoder.decode(entry.value), entry.revision or 0

    async def _perform(self, outcome: chains.Outcome) -> None:
        state = outcome.state
        jobs = [self._dispatch(state, sid) for sid in outcome.dispatch]
        if outcome.ended is not None:
            kind = outcome.ended.__struct_config__.tag
            jobs.append(self._publish_event(outcome.ended, f"{state.chain.id}.{kind}"))
        await asyncio.gather(*jobs)

    async def _dispatch(self, state: ChainState, step_id: str) -> None:
        st = state.steps[step_id]
        assert st.target is not None
        a = Assignment(
            chain_id=state.chain.id,
            step_id=step_id,
            attempt=st.attempt,
            tenant=state.tenant,
            step=graph.resolve(state.chain.step(step_id), state.steps),
            target=st.target,
            dispatched_at_ms=st.dispatched_at_ms or now_ms(),
            deadline_at_ms=state.deadline_at_ms,
            priority=state.chain.priority,
        )
        await self.bus.js.publish(
            self.subjects.work(st.target.pool), encode(a), headers={"Nats-Msg-Id": a.msg_id}
        )

    async def _publish_event(self, ev: Event, msg_id: str) -> None:
        kind = ev.__struct_config__.tag
        subject = self.subjects.event(ev.tenant, ev.chain_id, str(kind))
        await self.bus.js.publish(subject, encode(ev), headers={"Nats-Msg-Id": msg_id})

