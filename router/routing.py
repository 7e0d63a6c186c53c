"""The routing side of the router, called from small hooks in engine.py.

- `start` / `transition`: the chain transitions of chains.py with a Picker that knows the
  chain's remaining budget and deadline; then `finish` records the reservations, releases
  settled ones and schedules hedge timers, all in the transition's own compare-and-set.
- `observe`: every step result feeds the circuit breakers (KV `cy_breakers`).
- `on_timer`: durable timers of kind `capacity` (a step waiting for capacity looks again) and
  `hedge` (a slow attempt gets a hedge).
- `defer`: tenant fairness at intake.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from chainyard.contracts import (
    Chain,
    ChainState,
    Config,
    StepCompleted,
    StepFailed,
    Timer,
    now_ms,
)
from chainyard.runtime.nats import Bus

from . import budget, chains, hedge
from .breakers import Breakers
from .capacity import CapacityView
from .catalog import Catalog
from .fairness import Fairness
from .policy import Picker, Policy

if TYPE_CHECKING:
    from .engine import Router

log = logging.getLogger("chainyard.router.routing")
CAPACITY_RECHECK_S = 0.5
ROUTING_TIMERS = ("capacity", "hedge")


class Routing:
    def __init__(self, bus: Bus, config: Config, capacity: CapacityView, catalog: Catalog) -> None:
        self.bus = bus
        self.config = config
        self.capacity = capacity
        self.breakers = Breakers(bus.breakers, config)
        self.policy = Policy(catalog, capacity, config, self.breakers)
        self.fairness = Fairness(config.tenant_max_outstanding, ttl_s=2 * config.work_ack_wait_s)
        topo = bus.topology
        capacity.poll_backlog(self._backlog, config.backlog_poll_s)
        self._work_stream = topo.work.name
        self._durables = {d.pool: topo.pool_consumer(d.pool).durable for d in config.deployments}

    async def start(self) -> None:
        await self.capacity.start()
        await self.breakers.start()

    async def stop(self) -> None:
        await self.breakers.stop()
        await self.capacity.stop()

    async def _backlog(self, pool: str) -> tuple[int, int]:
        durable = self._durables.get(pool)
        if durable is None:
            return 0, 0
        info = await self.bus.js.consumer_info(self._work_stream, durable, timeout=1.0)
        return info.num_pending or 0, info.num_ack_pending or 0

    # -- transitions -------------------------------------------------------------------------

    def picker(self, state: ChainState | None, chain: Chain, t: int, **kw: Any) -> Picker:
        if state is None:
            left = chain.budget_usd
            deadline = t + chain.deadline_ms if chain.deadline_ms else None
        else:
            left = budget.remaining(state, kw.pop("release", None))
            deadline = state.deadline_at_ms
        return Picker(self.policy, left_usd=left, deadline_at_ms=deadline, now=t, **kw)

    def begin(self, chain: Chain, tenant: str, t: int) -> chains.Outcome:
        picker = self.picker(None, chain, t)
        return self.finish(None, chains.start(chain, tenant, t, picker), picker)

    def transition(
        self, state: ChainState, ev: StepCompleted | StepFailed, t: int, msg: Msg
    ) -> chains.Outcome:
        """A current step event -> the next state (the engine has checked `is_current`)."""
        if not (isinstance(ev, StepCompleted) and ev.cached):  # no provider was asked
            self.breakers.observe(ev)
        self.capacity.note_result(ev.target.pool)
        self.fairness.done(state.tenant, f"{ev.chain_id}.{ev.step_id}")
        if isinstance(ev, StepFailed):
            dropped = hedge.drop_attempt(state, ev)
            if dropped is not None:  # the step's other attempt is still running
                return chains.Outcome(state=dropped)
        min_context = 0
        if isinstance(ev, StepFailed) and ev.error.cls == "context_window":
            try:
                min_context = self.config.deployment(ev.target.deployment).context_window + 1
            except KeyError:
                pass
        picker = self.picker(state, state.chain, t, release=ev.step_id, min_context=min_context)
        if isinstance(ev, StepCompleted):
            return self.finish(state, chains.on_completed(state, ev, t, picker), picker)
        published = msg.metadata.timestamp.timestamp() * 1000 if msg.metadata.timestamp else t
        due = ev.error.retry_after_s is None or t >= published + ev.error.retry_after_s * 1000
        wait_until = state.deadline_at_ms or published + self.config.capacity_wait_s * 1000
        out = chains.on_failed(state, ev, t, picker, self.config.max_attempts, due, wait_until)
        return self.finish(state, out, picker)

    def finish(
        self, before: ChainState | None, out: chains.Outcome, picker: Picker
    ) -> chains.Outcome:
        if out.retry_after_s is not None:
            return out
        after = budget.seal(before, out.state, picker)
        timers = list(out.timers)
        for sid in out.dispatch:
            st = after.steps[sid]
            self.fairness.note(after.tenant, f"{after.chain.id}.{sid}")
            wait = hedge.hedge_after_ms(after, sid)
            if wait is not None and st.status == "dispatched":
                due = (st.dispatched_at_ms or picker.ctx.now_ms) + wait
                timers.append(_timer(after, sid, "hedge", st.attempt, due))
        if after is out.state and len(timers) == len(out.timers):
            return out
        return dataclasses.replace(out, state=after, timers=timers)

    # -- intake fairness ---------------------------------------------------------------------

    def defer(self, msg: Msg, tenant: str, chain: Chain) -> float | None:
        max_deliver = self.bus.topology.intake_consumer.max_deliver
        return self.fairness.defer_s(
            tenant, chain.priority, msg.metadata.num_delivered, max_deliver
        )

    # -- timers ------------------------------------------------------------------------------

    async def on_timer(self, router: Router, msg: Msg, timer: Timer) -> None:
        key = router.store.key(timer.tenant, timer.chain_id)
        t = now_ms()
        if timer.kind == "capacity":
            since = msg.metadata.timestamp.timestamp() * 1000 if msg.metadata.timestamp else t
            outcome = await router._apply(key, lambda s: self._capacity_due(s, timer, t, since))
        else:
            outcome = await router._apply(key, lambda s: self._hedge_due(router, s, timer, t))
        if outcome is not None and outcome.retry_after_s is not None:
            await msg.nak(delay=outcome.retry_after_s)
            return
        if outcome is not None:
            await router._perform(outcome)
            if timer.kind == "hedge":
                await self._send_hedge(router, outcome.state, timer)
        await msg.ack()

    def _capacity_due(
        self, state: ChainState | None, timer: Timer, t: int, since_ms: float
    ) -> chains.Outcome | None:
        if state is None:
            return None
        st = state.steps.get(timer.step_id)
        if state.status != "running" or st is None or st.status != "pending":
            # Placed or ended meanwhile, maybe by this timer before a crash: make sure what the
            # state implies went out (deduplicated).
            return chains.followups(state, t)
        picker = self.picker(state, state.chain, t)
        out = self.finish(state, chains._advance(state, t, picker, []), picker)
        if timer.step_id not in picker.waiting:
            return out
        limit = state.deadline_at_ms or since_ms + self.config.capacity_wait_s * 1000
        if t < limit:
            return chains.Outcome(state=state, retry_after_s=CAPACITY_RECHECK_S)
        why = picker.waiting[timer.step_id]
        waited = (
            "before the deadline"
            if state.deadline_at_ms
            else f"within {self.config.capacity_wait_s:g} s"
        )
        return chains._fail(state, t, f"{why} ({waited})", timer.step_id, None)

    def _hedge_due(
        self, router: Router, state: ChainState | None, timer: Timer, t: int
    ) -> chains.Outcome | None:
        if state is None or not hedge.hedge_wanted(state, timer.step_id, timer.attempt):
            return None if state is None else chains.Outcome(state=state)
        st = state.steps[timer.step_id]
        assert st.target is not None
        picker = self.picker(state, state.chain, t)
        target = picker(router._step_for(state, timer.step_id), [st.target.deployment, *st.tried])
        if isinstance(target, str):
            log.info("no hedge for %s.%s: %s", timer.chain_id, timer.step_id, target)
            return chains.Outcome(state=state)
        reserved = picker.reserved.get(timer.step_id, 0.0)
        return chains.Outcome(state=hedge.with_hedge(state, timer.step_id, target, reserved))

    async def _send_hedge(self, router: Router, state: ChainState, timer: Timer) -> None:
        st = state.steps.get(timer.step_id)
        if (
            state.status != "running"
            or st is None
            or st.status != "dispatched"
            or st.hedge_attempt != hedge.HEDGE_BASE + timer.attempt
            or st.hedge_target is None
        ):
            return
        await router.send_assignment(
            state, timer.step_id, st.hedge_attempt, st.hedge_target, now_ms(),
            st.hedge_reserved_usd, hedge=True,
        )  # fmt: skip


def _timer(state: ChainState, step_id: str, kind: str, attempt: int, due_at_ms: int) -> Timer:
    return Timer(
        kind=kind,  # type: ignore[arg-type]
        tenant=state.tenant,
        chain_id=state.chain.id,
        step_id=step_id,
        attempt=attempt,
        due_at_ms=due_at_ms,
    )
