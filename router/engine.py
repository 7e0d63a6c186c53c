"""The router service: intake -> chain state -> assignments; events, control, timers -> next steps.

Delivery discipline (DESIGN.md, NATS-NOTES.md): every state change is a compare-and-set on the
chain's KV revision; effects (assignments, timers, chain events) go out after the change is
recorded, with deterministic message ids; the incoming message is acked last. A crash anywhere
in between redelivers the message, and the redelivery finds the change recorded and repeats
only effects that the streams then deduplicate.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError

from chainyard.contracts import (
    Assignment,
    BadMessage,
    ChainRejected,
    ChainState,
    Config,
    ControlAccepted,
    ControlRejected,
    Event,
    FieldError,
    LlmStep,
    Step,
    StepCompleted,
    Target,
    Timer,
    WaitStep,
    cancel_decoder,
    chain_decoder,
    chain_digest,
    encode,
    new_id,
    now_ms,
    replay_decoder,
    step_event_decoder,
    timer_decoder,
)
from chainyard.runtime import chain_trace, messaging
from chainyard.runtime.consume import consume
from chainyard.runtime.faults import crash_point
from chainyard.runtime.metrics import metrics
from chainyard.runtime.nats import Bus, retry_api

from . import cache, chains, control, graph, loops
from .capacity import CapacityView
from .catalog import Catalog
from .hedge import is_current
from .routing import ROUTING_TIMERS, Routing
from .store import Conflict, StateStore

log = logging.getLogger("chainyard.router")
_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
UNKNOWN_CHAIN_TRIES = 8  # a control message for a chain not created yet waits ~6 s for it
# A roll-up of a deadline's schedule subject: it replaces (removes) the schedule, then expires
UNSCHEDULE = {"Nats-Rollup": "sub", "Nats-TTL": "1s"}
# decide(state or None, revision) -> what to do; None: nothing to record
Decide = Callable[[ChainState | None], chains.Outcome | None]


def _msgspec_path(e: Exception) -> tuple[str, str]:
    """Split msgspec's "... - at `$.steps[0].model`" into (path, message); a bad key of an
    object ("... - at `key` in `$.metadata`") is the object's, and the message says so."""
    text = str(e)
    if " - at `" in text:
        message, _, path = text.rpartition(" - at `")
        if path.startswith("key` in `"):
            return path.removeprefix("key` in `").rstrip("`"), f"{message} (a key)"
        return path.rstrip("`"), message
    return "$", text


class Router:
    def __init__(self, bus: Bus, config: Config, *, concurrency: int = 256) -> None:
        self.bus = bus
        self.config = config
        self.subjects = bus.topology.subjects
        self.capacity = CapacityView(bus.capacity, wakeable=config.scaled_to_zero())
        self.catalog = Catalog(config, self.capacity.seen)
        # The routing policy, breakers, budgets, hedges and fairness: everything that decides.
        self.routing = Routing(bus, config, self.capacity, self.catalog)
        self.policy = self.routing.policy
        self.concurrency = concurrency
        self.store = StateStore(
            bus.chains, bus.js, bus.topology.chains_kv, max_payload=bus.nc.max_payload
        )
        self.cache: cache.ResponseCache | None = None  # opened by `run`
        # Deadlines as message schedules (nats-server 2.12+; None: `run` asks the server).
        self.deadline_schedules: bool | None = None

    async def open_cache(self) -> None:
        topo = self.bus.topology
        self.cache = await cache.ResponseCache.open(
            self.bus.js, topo.subjects.prefix, self.config.cache, topo.replicas
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.open_cache()
        await self.routing.start()
        topo = self.bus.topology
        if self.deadline_schedules is None:  # (start-up waits out a leader election, as below)
            timers = await retry_api(lambda: self.bus.js.stream_info(topo.timers.name))
            self.deadline_schedules = bool(timers.config.allow_msg_schedules)
        self.store.ended_ttl_s = await self.ended_chain_ttl()
        loops_ = [
            (topo.intake, topo.intake_consumer, self.on_submit),
            (topo.events, topo.engine_consumer, self.on_step_event),
            (topo.intake, topo.control_consumer, self.on_control),
            (topo.timers, topo.timers_consumer, self.on_timer),
            (topo.timers, topo.deadlines_consumer, self.on_timer),
        ]
        try:
            subs = [await self.bus.durable(s, c) for s, c, _ in loops_]
            await asyncio.gather(*(
                consume(
                    sub, messaging.consumer(fn, c.durable), stop, self.concurrency,
                    name=c.durable, rebind=lambda s=s, c=c: self.bus.durable(s, c),
                )
                for sub, (s, c, fn) in zip(subs, loops_, strict=True)
            ))  # fmt: skip
        finally:
            await self.routing.stop()

    async def ended_chain_ttl(self) -> int:
        """The config's `ended_chain_ttl_s` where the chains' bucket takes a TTL per entry."""
        ttl = self.config.ended_chain_ttl_s
        if ttl:
            stream = f"KV_{self.bus.topology.chains_kv.bucket}"
            if not (await retry_api(lambda: self.bus.js.stream_info(stream))).config.allow_msg_ttl:
                log.warning("%s takes no TTL per entry (nats-server < 2.11?): ended chains "
                            "are kept until deleted", stream)  # fmt: skip
                return 0
        return ttl

    # -- the one way state changes -----------------------------------------------------------

    async def _apply(self, key: str, decide: Decide) -> chains.Outcome | None:
        """Load, decide, compare-and-set; on a conflict read again and decide again.

        A decision to record nothing (a duplicate or late event, an unknown chain, a refused
        control, a retry later) is only final when made on the chain's latest revision: a
        cached or follower copy may be behind another router replica's write, and acking an
        event on it would drop the transition it carries. So such a decision is made again
        on a fresh read before it stands (docs/DESIGN-NOTES.md #20)."""
        fresh = False
        while True:
            state, rev = await self.store.load(key, fresh=fresh)
            chain_trace.adopt_state(state)  # a message without trace context joins the chain's
            try:
                outcome = decide(state)
            except control.ControlError:
                if not fresh:
                    fresh = True
                    continue
                raise
            if outcome is None or outcome.state is state or outcome.retry_after_s is not None:
                if not fresh:
                    fresh = True
                    continue
                return outcome
            try:
                await self.store.update(key, outcome.state, rev)
            except Conflict:
                fresh = True
                continue
            crash_point("after_record")
            chain_trace.chain_recorded(state, outcome.state)  # ended: emit the chain's span
            return outcome

    # -- intake ----------------------------------------------------------------------------

    async def on_submit(self, msg: Msg) -> None:
        tenant = self.subjects.tenant_of_submit(msg.subject)
        try:
            chain = chain_decoder.decode(msg.data)
        except BadMessage as e:
            path, message = _msgspec_path(e)
            await self._reject(
                msg, tenant, self._claimed_id(msg), [FieldError(path=path, message=message)]
            )
            return
        errors = [FieldError(path=e.path, message=e.message) for e in graph.validate(chain)]
        errors += [FieldError(path=p, message=m) for p, m in self.catalog.problems(chain)]
        if errors:
            await self._reject(msg, tenant, chain.id, errors)
            return
        if (delay := self.routing.defer(msg, tenant, chain)) is not None:
            await msg.nak(delay=delay)  # the tenant is at its share: other tenants' chains first
            return
        begun = self.routing.begin(chain, tenant, now_ms())
        await self._create(msg, tenant, begun, chain_digest(msg.data))

    async def _create(
        self,
        msg: Msg,
        tenant: str,
        outcome: chains.Outcome,
        digest: str,
        answer: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        """Create a chain's state once; the same chain again (the same bytes: `digest`) is
        accepted once (its effects are performed again, deduplicated, in case the first attempt
        crashed before them); another chain under the same id is refused. `answer(accepted)`
        runs before the message is acked or refused (a replay's answer to its sender)."""
        outcome.state = msgspec.structs.replace(outcome.state, digest=digest)
        outcome = chain_trace.begin_chain(outcome)  # the chain's trace ids, kept in its state
        chain = outcome.state.chain
        key = self.store.key(tenant, chain.id)
        try:
            await self.store.create(key, outcome.state)
        except MaxPayloadError as e:  # under the limit as sent, over it with the chain's state
            why = f"the chain is too large to run: its state would not fit in a message ({e})"
            await self._reject(msg, tenant, chain.id, [FieldError(path="$", message=why)])
            return
        except Conflict:
            existing, _ = await self.store.load(key, fresh=True)
            same = existing is not None and (
                existing.digest == digest if existing.digest else existing.chain == chain
            )
            if existing is None or not same:
                err = FieldError(
                    path="$.id", message=f"chain id {chain.id!r} is already used by another chain"
                )
                if answer is not None:
                    await answer(False)
                await self._reject(msg, tenant, chain.id, [err], id_in_use=True)
                return
            outcome = chains.followups(existing, now_ms())
        await self._perform(outcome)
        if answer is not None:
            await answer(True)
        await msg.ack()

    def _claimed_id(self, msg: Msg) -> str:
        claimed = (msg.headers or {}).get("Nats-Msg-Id", "")
        return claimed if _ID_OK.match(claimed) else f"rejected-{new_id()}"

    async def _reject(
        self,
        msg: Msg,
        tenant: str,
        chain_id: str,
        errors: list[FieldError],
        *,
        id_in_use: bool = False,
    ) -> None:
        seq = msg.metadata.sequence.stream
        ev = ChainRejected(
            chain_id=chain_id, tenant=tenant, errors=errors, intake_seq=seq, id_in_use=id_in_use
        )
        log.info(
            "rejected %s/%s: %s",
            tenant,
            chain_id,
            "; ".join(f"{e.path}: {e.message}" for e in errors),
        )
        await self._publish_event(ev, f"{tenant}.{chain_id}.rejected.{seq}")
        await self._dead_letter(msg, "intake", "; ".join(e.message for e in errors), tenant)

    async def _dead_letter(self, msg: Msg, source: str, reason: str, tenant: str = "") -> None:
        """Keep what could not be processed for operators, then drop it from its stream."""
        headers = {"Cy-Reason": reason[:1000], "Cy-Subject": msg.subject}
        if tenant:
            headers["Cy-Tenant"] = tenant
        await self.bus.publisher.publish(
            self.subjects.dlq_subject(source), msg.data, headers=headers
        )
        metrics.record("dead", 1, source=source)
        await msg.term()

    # -- step events -------------------------------------------------------------------------

    async def on_step_event(self, msg: Msg) -> None:
        try:
            ev = step_event_decoder.decode(msg.data)
        except BadMessage as e:
            log.warning("poison step event on %s: %s", msg.subject, e)
            await self._dead_letter(msg, "events", str(e))
            return
        t = now_ms()
        current = [False]

        def decide(state: ChainState | None) -> chains.Outcome | None:
            current[0] = False
            if state is None:
                return None
            if not is_current(state, ev.step_id, ev.attempt):  # hedges: two attempts may be live
                # Duplicate or late (a zombie worker, a lost hedge): change nothing, but make
                # sure what the recorded state implies did go out.
                return chains.followups(state, t)
            current[0] = True
            return self.routing.transition(state, ev, t, msg)  # budget, breakers, failover

        outcome = await self._apply(self.store.key(ev.tenant, ev.chain_id), decide)
        if outcome is None:
            log.warning("event for unknown chain %s/%s", ev.tenant, ev.chain_id)
            await self._dead_letter(msg, "events", "unknown chain")
            return
        if outcome.retry_after_s is not None:
            await msg.nak(delay=outcome.retry_after_s)  # durable: JetStream brings it back
            return
        await self._perform(outcome)
        if current[0] and isinstance(ev, StepCompleted) and not ev.cached:
            await self._keep_answer(outcome.state, ev)
        await msg.ack()

    async def _keep_answer(self, state: ChainState, ev: StepCompleted) -> None:
        """Store a provider's answer for a step that opted in to the cache (a failure, or an
        answer that ended in error, never is)."""
        if self.cache is None or ev.output.finish_reason == "error":
            return
        step = cache.cached_step(loops.spec_of(state, ev.step_id))
        if step is None:
            return
        outcome = await self.cache.store(graph.resolve(step, state.steps), state.tenant, ev)
        if metrics.on:
            metrics.record("cache_stores", 1, pool=ev.target.pool, outcome=outcome)

    # -- control: cancel, signal, replay -----------------------------------------------------

    async def on_control(self, msg: Msg) -> None:
        """Apply a cancel, signal or replay, then answer it on the chain's events: one
        `control.accepted` once its transition is recorded, or one `control.rejected`."""
        # cy.control.<tenant>.<chain>.<verb...>
        parts = msg.subject.split(".")
        tenant, chain_id, verb = parts[2], parts[3], ".".join(parts[4:])
        key = self.store.key(tenant, chain_id)
        t = now_ms()
        try:
            if verb == "cancel":
                reason = cancel_decoder.decode(msg.data or b"{}").reason
                outcome = await self._apply(key, _known(lambda s: control.cancel(s, reason, t)))
                done = "cancelled"
            elif verb.startswith("signal.") and _ID_OK.match(name := verb[len("signal.") :]):
                data = _json_or_text(msg.data)
                said: list[str] = []

                def signal(s: ChainState) -> chains.Outcome:
                    out = control.signal(s, name, data, t, self.policy.pick)
                    said[:] = [_signalled(s, out.state, name)]
                    return out

                outcome = await self._apply(key, _known(signal))
                done = said[0]
            elif verb == "replay":
                req = replay_decoder.decode(msg.data)
                old, _ = await self.store.load(key, fresh=True)
                if old is None:
                    raise control.UnknownChain(f"no chain {chain_id!r}")
                new = control.replay(old, req, t, self.policy.pick)

                async def answer(accepted: bool) -> None:
                    if accepted:
                        what = f"replaying as chain {req.new_id!r}"
                        await self._control_accepted(
                            msg, tenant, chain_id, verb, what, new_chain_id=req.new_id
                        )
                    else:  # its new id is another chain's (chain.rejected on the new id, too)
                        why = f"chain id {req.new_id!r} is already used by another chain"
                        await self._control_answer(msg, tenant, chain_id, verb, why)

                digest = chain_digest(encode(new.state.chain))
                await self._create(msg, tenant, new, digest, answer)
                return
            else:
                raise control.ControlError(f"unknown control verb {verb!r}")
        except control.UnknownChain as e:
            n = msg.metadata.num_delivered or 1
            if n < UNKNOWN_CHAIN_TRIES:  # submitted a moment ago: its intake may not be done
                await msg.nak(delay=0.05 * 2 ** (n - 1))
                return
            await self._control_rejected(msg, tenant, chain_id, verb, str(e))
            return
        except (control.ControlError, *BadMessage) as e:
            if isinstance(e, control.ControlError) and e.effects is not None:
                await self._perform(e.effects)
            await self._control_rejected(msg, tenant, chain_id, verb, str(e))
            return
        if outcome is not None:
            await self._perform(outcome)
        await self._control_accepted(msg, tenant, chain_id, verb, done)
        await msg.ack()

    def _control_msg_id(self, msg: Msg, tenant: str, chain_id: str) -> str:
        # One id per control message for either answer: a redelivery never answers twice.
        return f"{tenant}.{chain_id}.control.{msg.metadata.sequence.stream}"

    async def _control_accepted(
        self, msg: Msg, tenant: str, chain_id: str, verb: str, what: str, **kw: str
    ) -> None:
        seq = msg.metadata.sequence.stream
        ev = ControlAccepted(
            chain_id=chain_id, tenant=tenant, verb=verb, message=what, intake_seq=seq, **kw
        )
        await self._publish_event(ev, self._control_msg_id(msg, tenant, chain_id))

    async def _control_answer(
        self, msg: Msg, tenant: str, chain_id: str, verb: str, why: str
    ) -> None:
        ev = ControlRejected(
            chain_id=chain_id,
            tenant=tenant,
            verb=verb,
            message=why,
            intake_seq=msg.metadata.sequence.stream,
        )
        await self._publish_event(ev, self._control_msg_id(msg, tenant, chain_id))

    async def _control_rejected(
        self, msg: Msg, tenant: str, chain_id: str, verb: str, why: str
    ) -> None:
        log.info("control %s on %s/%s refused: %s", verb, tenant, chain_id, why)
        await self._control_answer(msg, tenant, chain_id, verb, why)
        await self._dead_letter(msg, "control", why, tenant)

    # -- timers ------------------------------------------------------------------------------

    async def on_timer(self, msg: Msg) -> None:
        try:
            timer = timer_decoder.decode(msg.data)
        except BadMessage as e:
            await self._dead_letter(msg, "timers", str(e))
            return
        t = now_ms()
        if t < timer.due_at_ms:
            await msg.nak(delay=(timer.due_at_ms - t) / 1000)
            return
        if timer.kind in ROUTING_TIMERS:  # capacity waits and hedges
            await self.routing.on_timer(self, msg, timer)
            return
        if timer.kind in ("wait_timeout", "deadline"):
            outcome = await self._apply(
                self.store.key(timer.tenant, timer.chain_id), lambda s: _timer_due(s, timer, t)
            )
            if outcome is not None and outcome.retry_after_s is not None:
                await msg.nak(delay=outcome.retry_after_s)  # not due by the chain's own clock
                return
            if outcome is not None:
                await self._perform(outcome)
        await msg.ack()

    # -- effects -----------------------------------------------------------------------------

    async def _perform(self, outcome: chains.Outcome) -> None:
        state = outcome.state
        tenant, chain_id = state.tenant, state.chain.id
        jobs = [self._dispatch(state, sid) for sid in outcome.dispatch]
        jobs += [self._schedule(tm) for tm in outcome.timers]
        if outcome.ended is not None:
            if self.deadline_schedules and chains.deadline_waits(state):
                await self._unschedule_deadline(state)  # awaits no answer: no task for it
            kind = outcome.ended.__struct_config__.tag
            jobs.append(self._publish_event(outcome.ended, f"{tenant}.{chain_id}.{kind}"))
        if outcome.cancel:
            jobs.append(self.bus.nc.publish(self.subjects.cancel(tenant, chain_id), b""))
        if len(jobs) == 1:  # the common case: no task for it, so no extra turn of the loop
            await jobs[0]
        elif jobs:
            await asyncio.gather(*jobs)

    def _step_for(self, state: ChainState, step_id: str):
        step = graph.resolve(loops.spec_of(state, step_id), state.steps)
        if isinstance(step, LlmStep) and step.loop is not None:
            step = loops.loop_request(step, state.steps[step_id], self.capacity.tool_specs)
        return step

    async def _dispatch(self, state: ChainState, step_id: str) -> None:
        st = state.steps[step_id]
        assert st.target is not None, f"{step_id} dispatched without a target"
        step = self._step_for(state, step_id)
        if self.cache is not None and (wanted := cache.cached_step(step)) is not None:
            t0 = time.perf_counter()
            entry = await self.cache.lookup(wanted, state.tenant)
            if entry is not None:  # answered: the step's event instead of its assignment
                ms = (time.perf_counter() - t0) * 1000
                ev = cache.hit_event(
                    state, step_id, st.attempt, st.target, st.dispatched_at_ms or now_ms(),
                    entry, ms,
                )  # fmt: skip
                delta = self.subjects.delta(state.tenant, state.chain.id, step_id)
                await cache.publish_hit(
                    self.bus.publisher,
                    self.subjects.event(state.tenant, state.chain.id, "step.completed"),
                    delta if wanted.params.stream else None,
                    self.bus.nc,
                    ev,
                    wanted.model,
                )
                return
            if metrics.on:
                t = st.target
                metrics.record("cache_misses", 1, pool=t.pool, deployment=t.deployment)
        await self.send_assignment(
            state, step_id, st.attempt, st.target, st.dispatched_at_ms, st.reserved_usd,
            step=step,
        )  # fmt: skip

    async def send_assignment(
        self,
        state: ChainState,
        step_id: str,
        attempt: int,
        target: Target,
        dispatched_at_ms: int | None,
        reserved_usd: float,
        *,
        hedge: bool = False,
        step: Step | None = None,
    ) -> None:
        """Publish one attempt of a step to its pool, references resolved, in a routing span."""
        a = Assignment(
            chain_id=state.chain.id,
            step_id=step_id,
            attempt=attempt,
            tenant=state.tenant,
            step=step or self._step_for(state, step_id),
            target=target,
            dispatched_at_ms=dispatched_at_ms or now_ms(),
            deadline_at_ms=state.deadline_at_ms,
            priority=state.chain.priority,
            reserved_usd=reserved_usd or None,
            hedge=hedge,
        )
        await chain_trace.publish_work(  # with the routing decision when the chain is traced
            self.bus.publisher,
            self.subjects.work(target.pool),
            encode(a),
            a,
            state,
            lambda: (
                [d.name for d in self.catalog.deployments(a.step)]
                if isinstance(a.step, LlmStep)
                else [target.deployment]
            ),
            self.config.strategy,
        )

    async def _schedule(self, timer: Timer) -> None:
        """A durable timer: a message the router naks until it is due. A chain's deadline,
        which every chain with `deadline_ms` has for as long as it runs, is a message schedule
        instead where the server has them: the server publishes it to the deadline subject
        when due, so until then no router handles it and no consumer holds it pending."""
        msg_id = f"{timer.tenant}.{timer.chain_id}.{timer.step_id}.{timer.attempt}.{timer.kind}"
        headers = None
        if timer.kind != "deadline":
            subject = self.subjects.timer(timer.tenant, timer.chain_id, timer.step_id)
        elif not self.deadline_schedules:
            subject = self.subjects.deadline(timer.tenant, timer.chain_id)
        else:
            due = datetime.fromtimestamp(timer.due_at_ms / 1000, UTC)
            subject = self.subjects.deadline_schedule(timer.tenant, timer.chain_id, timer.due_at_ms)
            headers = {
                "Nats-Schedule": f"@at {due.isoformat(timespec='milliseconds')}",
                "Nats-Schedule-Target": self.subjects.deadline(timer.tenant, timer.chain_id),
            }
        await messaging.publish(self.bus.publisher, subject, encode(timer), msg_id, headers=headers)

    async def _unschedule_deadline(self, state: ChainState) -> None:
        """A chain that ended before its deadline removes the deadline's schedule: a roll-up
        on its subject, which then expires. Sent without waiting for the stream's answer: one
        lost (or refused by a server without TTLs) only leaves the schedule to fire, and the
        router then finds the chain ended, as it always could (DESIGN-NOTES #8)."""
        assert state.deadline_at_ms is not None
        subject = self.subjects.deadline_schedule(
            state.tenant, state.chain.id, state.deadline_at_ms
        )
        await self.bus.nc.publish(subject, b"", headers=UNSCHEDULE)

    async def _publish_event(self, ev: Event, msg_id: str) -> None:
        kind = ev.__struct_config__.tag
        subject = self.subjects.event(ev.tenant, ev.chain_id, str(kind))
        await messaging.publish(self.bus.publisher, subject, encode(ev), msg_id)


def _timer_due(state: ChainState | None, timer: Timer, t: int) -> chains.Outcome | None:
    """A chain's wait timeout or deadline: its transition, or, for a chain that has ended
    (maybe by this timer, before a crash), its end event again (deduplicated)."""
    if state is None:
        return None
    if timer.kind == "deadline":
        return chains.on_deadline(state, t)
    out = control.wait_timeout(state, timer, t)
    if out is None and state.status != "running":
        return chains.followups(state, t)
    return out


def _known(fn: Callable[[ChainState], chains.Outcome | None]) -> Decide:
    def decide(state: ChainState | None) -> chains.Outcome | None:
        if state is None:
            raise control.UnknownChain("no such chain")
        return fn(state)

    return decide


def _signalled(before: ChainState, after: ChainState, name: str) -> str:
    """What a signal did, for its sender."""
    if name in before.signals:
        return f"signal {name!r} was already recorded; nothing changed"
    waits = [s.id for s in before.chain.steps if isinstance(s, WaitStep) and s.signal == name]
    if not waits:
        return f"signal {name!r} recorded; no wait step of the chain waits for it"
    woke = [
        sid
        for sid in waits
        if before.steps[sid].status == "waiting" and after.steps[sid].status != "waiting"
    ]
    if woke:
        return f"signal {name!r} released {', '.join(repr(w) for w in woke)}"
    return f"signal {name!r} recorded; it releases {', '.join(map(repr, waits))} when reached"


def _json_or_text(data: bytes) -> object:
    if not data:
        return None
    try:
        return msgspec.json.decode(data)
    except BadMessage:
        return data.decode(errors="replace")
