"""The worker runtime: one durable pull consumer per pool, bounded slots, heartbeats, drain.

Per work message: decode -> drop if its chain was cancelled or its deadline passed -> skip if
its result is already recorded -> fail and dead-letter it if it was delivered more than
`work_max_deliver` times (it took its workers down) -> wait out a provider throttle -> execute
-> publish the result event and wait for its ack -> ack the work. A crash anywhere before the
last ack redelivers the message; the event's message id and the router's compare-and-set make
the second result change nothing. JetStream being unavailable costs no delivery: the result is
published again in place (the work kept in progress), and a chain state that cannot be read on
redelivery counts as not recorded.

Cancellation: every worker listens (core NATS) on `cy.cancel.*.*`; a cancelled chain's calls in
flight here are cancelled and end as step.failed "cancelled", and work for it that arrives later
(within RECENT_CANCEL_S) is dropped the same way, never sent to the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, NoStreamResponseError, ServiceUnavailableError

from chainyard.contracts import (
    Assignment,
    BadMessage,
    ErrorInfo,
    Event,
    Heartbeat,
    Output,
    StepCompleted,
    StepFailed,
    Target,
    ToolSpec,
    Usage,
    assignment_decoder,
    encode,
    now_ms,
    state_decoder,
)
from chainyard.runtime import messaging
from chainyard.runtime.consume import Slots, consume, release_slot
from chainyard.runtime.faults import crash_point
from chainyard.runtime.metrics import metrics
from chainyard.runtime.nats import Bus

from .cancels import Recent
from .health import Health
from .providers._base import ProviderError, RateLimits

log = logging.getLogger("chainyard.worker")
FETCH_BATCH = 256  # one fetch takes at most this many messages, however many slots are free
# JetStream did not take a result (no stream leader, no answer, disconnected): the worker keeps
# the work message and publishes again, every RESULT_RETRY_S (_publish).
UNAVAILABLE = (
    NatsTimeoutError,
    NoStreamResponseError,
    NoRespondersError,
    ServiceUnavailableError,
    OutboundBufferLimitError,
)
RESULT_RETRY_S = 0.5


@dataclass(frozen=True, kw_only=True)
class Result:
    """What an executor returns for one assignment."""

    output: Output
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    model: str | None = None  # the model the provider says answered
    ttft_ms: float | None = None
    limits: RateLimits | None = None


# execute(assignment, on_delta) -> Result, raising ProviderError for a failed call
Execute = Callable[[Assignment, Callable[[str], None] | None], Awaitable[Result]]


def default_worker_id(pool: str) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{pool}".replace(".", "_")


class Worker:
    """Serves one pool. Any number of Worker processes may serve the same pool."""

    def __init__(
        self,
        bus: Bus,
        pool: str,
        execute: Execute,
        *,
        slots: int = 64,
        worker_id: str | None = None,
        models: list[str] | None = None,
        tools: list[ToolSpec] | None = None,
        heartbeat_s: float = 2.0,
        close: Callable[[], Awaitable[None]] | None = None,
        fetch_batch: int = FETCH_BATCH,
    ) -> None:
        self.bus = bus
        self.pool = pool
        self.execute = execute
        self.slots = Slots(slots)
        self.id = worker_id or default_worker_id(pool)
        self.models = models or []
        self.tools = tools or []  # advertised in heartbeats, so agent loops can offer them
        self.heartbeat_s = heartbeat_s
        self._close = close  # what the executor holds (a provider's connections), after draining
        self.health = Health()
        self.subjects = bus.topology.subjects
        self.fetch_batch = fetch_batch
        self.max_deliver = bus.topology.work_max_deliver  # beyond it: poison work (_poison)
        self._in_flight: dict[int, tuple[Msg, float]] = {}
        self._calls: dict[str, set[asyncio.Task[Any]]] = {}  # <tenant>.<chain> -> tasks in a call
        self._chain_cancels: set[asyncio.Task[Any]] = set()  # tasks cancelled by a chain cancel
        self.cancelled = Recent()
        self._draining = False
        self._stop = asyncio.Event()  # run()'s
        self.completed = 0

    @property
    def _key(self) -> str:
        return f"{self.pool}.{self.id}"

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then stop fetching, finish what is in flight, and leave."""
        self._stop = stop
        topo = self.bus.topology
        consumer = topo.pool_consumer(self.pool)
        durable = await self.bus.durable(topo.work, consumer)
        cancels = await self.bus.nc.subscribe(self.subjects.all_cancel, cb=self._on_cancel)
        side = [
            asyncio.create_task(self._heartbeats(stop)),
            asyncio.create_task(self._keep_alive(consumer.ack_wait_s / 3)),
        ]
        await self._beat()
        try:
            await consume(
                durable,
                messaging.consumer(self._on_work, consumer.durable, pool=self.pool),
                stop,
                self.slots.total,
                name=self.pool,
                slots=self.slots,
                gate=self.health.gate,
                max_batch=self.fetch_batch,
                rebind=lambda: self.bus.durable(topo.work, consumer),
            )
        finally:
            self._draining = True
            for t in side:
                t.cancel()
            with contextlib.suppress(Exception):
                await cancels.unsubscribe()
            with contextlib.suppress(Exception):
                await self.bus.capacity.delete(self._key)
            if self._close is not None:
                try:
                    await self._close()
                except Exception as e:
                    log.warning("%s: closing the provider: %s", self.pool, e)

    # -- one work message ------------------------------------------------------------------

    async def _on_work(self, msg: Msg) -> None:
        try:
            a = assignment_decoder.decode(msg.data)
        except BadMessage as e:
            log.warning("%s: malformed assignment: %s", self.pool, e)
            headers = {"Cy-Reason": str(e)[:1000], "Cy-Subject": msg.subject}  # redrivable
            await self.bus.publisher.publish(
                self.subjects.dlq_subject("work"), msg.data, headers=headers
            )
            metrics.record("dead", 1, source="work")
            await msg.term()
            return
        started = now_ms()
        # Kept in progress from here (_keep_alive), also while a result waits for JetStream.
        self._in_flight[id(msg)] = (msg, time.monotonic())
        try:
            if await self._dropped(a, msg, started):
                return
            delivered = msg.metadata.num_delivered or 1
            if delivered > 1 and await self._already_recorded(a):
                await msg.ack()
                return
            if delivered > self.max_deliver:
                await self._poison(a, msg, delivered, started)
                return
            if self.health.throttled_until_ms > now_ms():
                await self.health.wait_unthrottled()  # in progress meanwhile: _keep_alive
                started = now_ms()  # the pause counts as queued time, not as the call's
                if await self._dropped(a, msg, started):
                    return
            await self._run_call(a, msg, started)
        finally:
            self._in_flight.pop(id(msg), None)

    async def _dropped(self, a: Assignment, msg: Msg, started: int) -> bool:
        """Fail and ack, without a provider call, work of a cancelled chain or past its deadline."""
        err = None
        if f"{a.tenant}.{a.chain_id}" in self.cancelled:
            err = ErrorInfo(cls="cancelled", message="the chain was cancelled")
        elif a.deadline_at_ms is not None and now_ms() > a.deadline_at_ms:
            late = now_ms() - a.deadline_at_ms
            err = ErrorInfo(
                cls="expired", message=f"deadline passed {late} ms before the step could start"
            )
        if err is None:
            return False
        await self._publish(self._failed(a, err, started))
        await msg.ack()
        return True

    async def _poison(self, a: Assignment, msg: Msg, delivered: int, started: int) -> None:
        """Work that took its worker down on every delivery (a crash, a hang past the ack
        wait): fail the step so the router ends or moves its chain, keep the message for
        operators, drop it from the queue.

        The pool consumer has no server-side max_deliver (JetStream would drop the message
        without a word): this bound is the worker's own."""
        why = (
            f"the step crashed or hung its worker on {delivered - 1} deliveries; "
            "it is not run again (dead-lettered)"
        )
        log.error("%s: work %s: %s", self.pool, a.msg_id, why)
        await self._publish(self._failed(a, ErrorInfo(cls="fatal", message=why), started))
        headers = {
            "Cy-Reason": why,
            "Cy-Subject": msg.subject,
            "Cy-Tenant": a.tenant,
            "Cy-Chain": a.chain_id,
            "Cy-Step": a.step_id,
            "Nats-Msg-Id": f"{a.msg_id}.dlq",  # a crash before term() stores it once
        }
        await self.bus.publisher.publish(
            self.subjects.dlq_subject("work"), msg.data, headers=headers
        )
        metrics.record("dead", 1, source="work")
        await msg.term()

    async def _run_call(self, a: Assignment, msg: Msg, started: int) -> None:
        t0 = time.perf_counter()
        stream = getattr(getattr(a.step, "params", None), "stream", False)
        # The call runs in this handler's own task (no task per call); a chain cancel cancels
        # this task, marked in _chain_cancels so it is told apart from being stopped.
        task = asyncio.current_task()
        assert task is not None
        calls = self._calls.setdefault(f"{a.tenant}.{a.chain_id}", set())
        calls.add(task)
        try:
            result = await self.execute(a, self._delta_sink(a) if stream else None)
        except asyncio.CancelledError:
            if task not in self._chain_cancels:  # we are being stopped: not a chain cancel
                raise
            self._chain_cancels.discard(task)
            if task.uncancel():  # stopped as well
                raise
            latency = (time.perf_counter() - t0) * 1000
            err = ErrorInfo(cls="cancelled", message="the chain was cancelled during the call")
            event: Event = self._failed(a, err, started, latency)
        except ProviderError as e:
            latency = (time.perf_counter() - t0) * 1000
            self.health.record_failure(a.target.deployment, e, latency)
            err = ErrorInfo(
                cls=e.cls, message=e.message, status=e.status, retry_after_s=e.retry_after_s
            )
            event = self._failed(a, err, started, latency)
        except Exception as e:  # a bug in an executor must not kill the worker
            log.exception("%s: executor crashed on %s", self.pool, a.msg_id)
            err = ErrorInfo(cls="fatal", message=f"{type(e).__name__}: {e}")
            event = self._failed(a, err, started, (time.perf_counter() - t0) * 1000)
        else:
            latency = (time.perf_counter() - t0) * 1000
            self.health.record_success(a.target.deployment, latency, result.ttft_ms, result.limits)
            event = StepCompleted(
                chain_id=a.chain_id,
                step_id=a.step_id,
                attempt=a.attempt,
                tenant=a.tenant,
                output=result.output,
                usage=result.usage,
                cost_usd=result.cost_usd,
                target=_answered(a.target, result.model),
                worker=self.id,
                dispatched_at_ms=a.dispatched_at_ms,
                started_at_ms=started,
                latency_ms=latency,
                ttft_ms=result.ttft_ms,
            )
        finally:
            calls.discard(task)
            if not calls:
                self._calls.pop(f"{a.tenant}.{a.chain_id}", None)
            if task in self._chain_cancels:  # cancelled, but the call ended without seeing it
                self._chain_cancels.discard(task)
                task.uncancel()
        release_slot()  # the slots bound provider calls: the next message may start meanwhile
        await self._publish(event)  # durable first ...
        crash_point("after_publish")
        await msg.ack()  # ... then the work is done
        self.completed += 1

    def _failed(
        self, a: Assignment, err: ErrorInfo, started: int, latency: float = 0.0
    ) -> StepFailed:
        return StepFailed(
            chain_id=a.chain_id,
            step_id=a.step_id,
            attempt=a.attempt,
            tenant=a.tenant,
            error=err,
            target=a.target,
            worker=self.id,
            dispatched_at_ms=a.dispatched_at_ms,
            started_at_ms=started,
            latency_ms=latency,
        )

    async def _publish(self, ev: StepCompleted | StepFailed) -> None:
        kind = ev.__struct_config__.tag
        subject = self.subjects.event(ev.tenant, ev.chain_id, str(kind))
        msg_id = f"{ev.tenant}.{ev.chain_id}.{ev.step_id}.{ev.attempt}.{kind}"
        metrics.step_result(ev)
        data = encode(ev)
        for attempt in itertools.count():
            try:
                await messaging.publish(self.bus.publisher, subject, data, msg_id)  # traceparent
                return
            except UNAVAILABLE as e:
                # Not a nak: its redelivery would count as a delivery (toward the poison bound)
                # and call the provider again. The message stays ours (in progress) meanwhile;
                # the same message id makes a publish that did land before a timeout count once.
                if self._stop.is_set():
                    raise
                if attempt == 0:
                    log.warning("%s: result %s not stored (%r); retrying", self.pool, msg_id, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), RESULT_RETRY_S)

    async def _already_recorded(self, a: Assignment) -> bool:
        """On redelivery only: was this step's result already recorded? Then don't call again."""
        try:
            entry = await self.bus.chains.get(f"{a.tenant}.{a.chain_id}")
        except KeyNotFoundError:
            return False
        except (NatsError, TimeoutError) as e:
            # The bucket has no leader, say: run the step. A failed attempt would be nak'ed and
            # use up a delivery; if it was recorded, the router's compare-and-set ignores this.
            log.warning("%s: chain state unreadable for %s (%r)", self.pool, a.msg_id, e)
            return False
        if not entry.value:
            return False
        state = state_decoder.decode(entry.value)
        st = state.steps.get(a.step_id)
        return state.status != "running" or (
            st is not None and st.attempt >= a.attempt and st.status != "dispatched"
        )

    async def _on_cancel(self, msg: Msg) -> None:
        key = msg.subject.split(".", 2)[-1]  # cy.cancel.<tenant>.<chain>: the tenant is in it
        self.cancelled.add(key)
        for task in list(self._calls.get(key, ())):
            if task not in self._chain_cancels:
                self._chain_cancels.add(task)
                task.cancel()

    def _delta_sink(self, a: Assignment) -> Callable[[str], None]:
        subject = self.subjects.delta(a.tenant, a.chain_id, a.step_id)
        nc = self.bus.nc

        def send(text: str) -> None:
            # Best effort: a delta that cannot go out is dropped, the final event has it all.
            task = asyncio.ensure_future(nc.publish(subject, text.encode()))
            task.add_done_callback(lambda t: t.exception())

        return send

    # -- background --------------------------------------------------------------------------

    async def _beat(self) -> None:
        hb = Heartbeat(
            pool=self.pool,
            worker=self.id,
            slots_total=self.slots.total,
            slots_free=self.slots.free,
            at_ms=now_ms(),
            interval_ms=int(self.heartbeat_s * 1000),
            models=self.models,
            tools=self.tools,
            deployments=self.health.snapshot(),
            draining=self._draining,
        )
        await self.bus.capacity.put(self._key, encode(hb))

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.heartbeat_s)
            try:
                self._draining = stop.is_set()
                await self._beat()
            except Exception as e:
                log.warning("%s: heartbeat failed: %s", self.pool, e)

    async def _keep_alive(self, every_s: float) -> None:
        """Mark long calls in progress so the server does not redeliver them to another worker."""
        while True:
            await asyncio.sleep(every_s)
            now = time.monotonic()
            for msg, since in list(self._in_flight.values()):
                if now - since >= every_s:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()


def _answered(target: Target, model: str | None) -> Target:
    if not model or model == target.model:
        return target
    return Target(
        deployment=target.deployment, pool=target.pool, provider=target.provider, model=model
    )
