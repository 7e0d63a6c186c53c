"""The worker runtime against real nats-server and the wire-format sandbox: live capacity in
heartbeats, backing off after 429s, cost, streamed deltas, expiry, long calls, cancellation."""

from __future__ import annotations

import time

import msgspec
import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from helpers import Events, heartbeat_seen, running, stream_messages, wait_until
from worker_support import POOL, TENANT, assignment, config, now_ms, publish, work_state, worker

from chainyard.contracts import Deployment, Heartbeat, Price, StepCompleted, StepFailed
from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer
from chainyard.workers.cancels import Recent
from chainyard.workers.providers import ProviderError

EVENTS = f"cy.events.{TENANT}.>"


def _done(e: object) -> bool:
    return isinstance(e, StepCompleted | StepFailed)


def _settled(bus: Bus):
    """A check for wait_until: the work stream's state once nothing is left or pending."""

    async def check() -> tuple[int, int, int] | None:
        state = await work_state(bus)
        return state if state[:2] == (0, 0) else None

    return check


@pytest.fixture
async def sandbox() -> SandboxServer:
    async with SandboxServer(SandboxConfig()) as s:
        yield s  # type: ignore[misc]


async def test_heartbeat_reports_rate_limits_latency_and_slots(
    bus: Bus, sandbox: SandboxServer
) -> None:
    await sandbox.configure(
        remaining_requests=4321,
        remaining_tokens=98765,
        reset_requests_s=7,
        reset_tokens_s=90,
        latency_ms=20,
    )
    w = worker(bus, config(sandbox.url, slots=5), heartbeat_s=0.1)
    async with Events(bus.nc, EVENTS) as ev, running(w):
        before = now_ms()
        await publish(bus, assignment("hb1"))
        done = await ev.wait(_done)
        assert isinstance(done, StepCompleted), done

        async def beat() -> Heartbeat | None:
            entry = await bus.capacity.get(f"{POOL}.{w.id}")
            hb = msgspec.json.decode(entry.value, type=Heartbeat)
            return hb if "d-free" in hb.deployments and hb.slots_free == 5 else None

        hb = await wait_until(beat, 10, "a heartbeat that has seen the call")
    assert (hb.pool, hb.slots_total, hb.slots_free) == (POOL, 5, 5)
    d = hb.deployments["d-free"]
    assert (d.remaining_requests, d.remaining_tokens) == (4321, 98765)
    assert d.reset_requests_at_ms is not None and d.reset_tokens_at_ms is not None
    assert before + 6_000 <= d.reset_requests_at_ms <= now_ms() + 7_000
    assert before + 89_000 <= d.reset_tokens_at_ms <= now_ms() + 90_000
    assert d.calls == 1 and d.error_rate == 0.0
    assert d.latency_ms is not None and d.latency_ms >= 20
    assert d.throttled_until_ms is None


async def test_after_429_the_worker_pauses_instead_of_hammering(
    bus: Bus, sandbox: SandboxServer
) -> None:
    slots, n, window_s, retry_after_s = 4, 40, 1.5, 1.0
    w = worker(bus, config(sandbox.url, slots=slots), heartbeat_s=0.1)
    async with Events(bus.nc, EVENTS) as ev, running(w):
        await heartbeat_seen(bus.capacity, POOL)
        t0 = now_ms()
        await sandbox.configure(rate_limit_for_s=window_s, retry_after_s=retry_after_s)
        await publish(bus, *[assignment(f"rl{i}") for i in range(n)])
        await ev.wait(_done, timeout=30, count=n)
        events = [e for _, e in ev.received if _done(e)]
    throttled = [e for e in events if isinstance(e, StepFailed)]
    completed = [e for e in events if isinstance(e, StepCompleted)]
    # every step ends exactly once
    assert sorted(e.chain_id for e in events) == sorted(f"rl{i}" for i in range(n))
    assert all(e.error.status == 429 and e.error.cls == "retryable" for e in throttled)
    assert all(e.error.retry_after_s == retry_after_s for e in throttled)
    # a hot loop would have sent all 40 into the window; pausing lets one slot-full through
    # per retry-after: at most slots x (window / retry-after + 1)
    assert 1 <= len(throttled) <= slots * 3, len(throttled)
    assert sandbox.counts["openai.chat"] == n  # one call per step, no retries by the worker
    # work resumed after the pause (started_at_ms is when a call began)
    assert len(completed) == n - len(throttled)
    assert min(e.started_at_ms for e in completed) >= t0 + retry_after_s * 1000 - 50


async def test_a_step_held_by_a_pause_starts_when_its_call_does(
    bus: Bus, sandbox: SandboxServer
) -> None:
    """started_at_ms is when the provider call began: a pause for retry-after is queued time,
    so started_at_ms + latency_ms is when the call ended (as `chainyard trace` draws it)."""
    w = worker(bus, config(sandbox.url, slots=1), heartbeat_s=0.1)
    async with Events(bus.nc, EVENTS) as ev, running(w):
        await heartbeat_seen(bus.capacity, POOL)  # idle: its pull request is out
        # a 429 as a call would report it; "held" comes through the request already out
        throttled = ProviderError("retryable", "429", status=429, retry_after_s=1.0)
        w.health.record_failure("d-free", throttled, 1.0)
        paused_until = w.health.throttled_until_ms
        await publish(bus, assignment("held"))
        held = await ev.wait(_done)
    assert isinstance(held, StepCompleted), held
    assert held.started_at_ms >= paused_until, (held.started_at_ms, paused_until)
    assert held.dispatched_at_ms < paused_until - 500  # it did wait: as queued time


async def test_cost_from_price_table_and_from_override(bus: Bus, sandbox: SandboxServer) -> None:
    extra = [
        Deployment(name="d-table", pool=POOL, model="gpt-4o-mini"),
        Deployment(
            name="d-over",
            pool=POOL,
            model="gpt-4o-mini",
            price=Price(input_per_mtok=3.0, output_per_mtok=7.0),
        ),
    ]
    w = worker(bus, config(sandbox.url, extra=extra))
    text = "one two three four five six"
    async with Events(bus.nc, EVENTS) as ev, running(w):
        await publish(
            bus,
            assignment("c-table", text=text, deployment="d-table", model="gpt-4o-mini"),
            assignment("c-over", text=text, deployment="d-over", model="gpt-4o-mini"),
        )
        await ev.wait(_done, count=2)
    got = {e.chain_id: e for _, e in ev.received if isinstance(e, StepCompleted)}
    assert set(got) == {"c-table", "c-over"}, ev.received
    # the sandbox counts words: input = the message, output = "echo: " + the message
    for e in got.values():
        assert (e.usage.input_tokens, e.usage.output_tokens) == (6, 7)
    table = calc_price(
        GenaiUsage(input_tokens=6, output_tokens=7), "gpt-4o-mini", provider_id="openai"
    )
    assert got["c-table"].cost_usd > 0
    assert got["c-table"].cost_usd == pytest.approx(float(table.total_price), rel=1e-9)
    assert got["c-over"].cost_usd == pytest.approx((6 * 3.0 + 7 * 7.0) / 1e6, rel=1e-9)


async def test_streamed_deltas_join_to_the_final_output(bus: Bus, sandbox: SandboxServer) -> None:
    await sandbox.configure(chunk_delay_ms=2)
    w = worker(bus, config(sandbox.url))
    deltas: list[str] = []

    async def on_delta(msg: object) -> None:
        deltas.append(msg.data.decode())  # type: ignore[attr-defined]

    sub = await bus.nc.subscribe(bus.subjects.delta(TENANT, "st1", "s"), cb=on_delta)
    text = "the quick brown fox jumps over the lazy dog"
    async with Events(bus.nc, EVENTS) as ev, running(w):
        await publish(bus, assignment("st1", text=text, stream=True))
        done = await ev.wait(_done)
    assert isinstance(done, StepCompleted), done
    assert done.output.text == f"echo: {text}"
    await wait_until(
        lambda: "".join(deltas) == done.output.text, 5, f"deltas to add up, got {deltas}"
    )
    assert len(deltas) == len(done.output.text.split())  # one per word: really streamed
    assert done.ttft_ms is not None and done.usage.output_tokens == 10
    assert sandbox.last("openai.chat").body["stream"] is True
    await sub.unsubscribe()


async def test_expired_step_is_dropped_with_an_event_never_sent(
    bus: Bus, sandbox: SandboxServer
) -> None:
    w = worker(bus, config(sandbox.url))
    async with Events(bus.nc, EVENTS) as ev, running(w):
        await publish(bus, assignment("late", deadline_at_ms=now_ms() - 5), assignment("ontime"))
        await ev.wait(_done, count=2)
        left, pending, _ = await wait_until(_settled(bus), 5, "the work acked")
    by = {e.chain_id: e for _, e in ev.received if _done(e)}
    assert isinstance(by["late"], StepFailed) and by["late"].error.cls == "expired"
    assert isinstance(by["ontime"], StepCompleted)
    assert sandbox.counts["openai.chat"] == 1  # only the step on time reached the provider
    assert (left, pending) == (0, 0)


async def test_malformed_assignment_is_dead_lettered_redrivable_and_work_goes_on(
    bus: Bus, sandbox: SandboxServer
) -> None:
    w = worker(bus, config(sandbox.url))
    subject = bus.subjects.work(POOL)
    async with Events(bus.nc, EVENTS) as ev, running(w):
        await bus.js.publish(subject, b'{"chain_id": 7}')
        await publish(bus, assignment("fine"))
        await ev.wait(_done)
        await wait_until(_settled(bus), 5, "the work acked")
    (dead,) = await stream_messages(bus.js, bus.topology.dlq.name, bus.subjects.dlq_subject("work"))
    assert dead.data == b'{"chain_id": 7}'
    assert dead.headers is not None and dead.headers["Cy-Subject"] == subject  # redrive target
    assert "Expected `str`" in dead.headers["Cy-Reason"]
    assert isinstance(ev.received[0][1], StepCompleted)


async def test_long_call_is_kept_in_progress_not_redelivered(
    nats_server: NatsServer, sandbox: SandboxServer
) -> None:
    cfg = config(sandbox.url, ack_wait_s=2.0)
    assert cfg.topology.pool_consumer(POOL).ack_wait_s == 2.0
    bus = await open_bus(nats_server.url, name="t", topology=cfg.topology)
    await sandbox.configure(latency_ms=5000)
    try:
        w = worker(bus, cfg)
        async with Events(bus.nc, EVENTS) as ev, running(w):
            t0 = time.monotonic()
            await publish(bus, assignment("long"))
            done = await ev.wait(_done, timeout=20)
            assert time.monotonic() - t0 >= 5.0
            _, _, redelivered = await work_state(bus)
        assert isinstance(done, StepCompleted), done
        assert redelivered == 0
        assert sandbox.counts["openai.chat"] == 1
        assert len([e for _, e in ev.received if _done(e)]) == 1
    finally:
        await bus.close()


async def test_cancel_stops_in_flight_calls_and_drops_later_work(
    bus: Bus, sandbox: SandboxServer
) -> None:
    await sandbox.configure(latency_ms=10_000)
    w = worker(bus, config(sandbox.url))
    async with Events(bus.nc, "cy.events.*.>") as ev, running(w):
        await publish(bus, assignment("doomed", "a"), assignment("doomed", "b"))
        await wait_until(lambda: sandbox.counts["openai.chat"] == 2, 10, "both calls in flight")
        t0 = time.monotonic()
        await bus.nc.publish(bus.subjects.cancel("acme", "doomed"), b"")
        await ev.wait(lambda e: isinstance(e, StepFailed), timeout=5, count=2)
        assert time.monotonic() - t0 < 3  # not after the 10 s call
        # work for the cancelled chain arriving later: dropped, never sent
        await sandbox.configure(latency_ms=0)
        # ... and another tenant's chain of the same id is not touched
        await publish(
            bus,
            assignment("doomed", "c"),
            assignment("other", "x"),
            assignment("doomed", "y", tenant="beta"),
        )
        await ev.wait(_done, count=5)
        left, pending, redelivered = await wait_until(_settled(bus), 5, "the work acked")
    by = {(e.chain_id, e.step_id): e for _, e in ev.received if _done(e)}
    for step in ("a", "b", "c"):
        e = by[("doomed", step)]
        assert isinstance(e, StepFailed) and e.error.cls == "cancelled", e
    assert isinstance(by[("other", "x")], StepCompleted)
    assert isinstance(by[("doomed", "y")], StepCompleted) and by[("doomed", "y")].tenant == "beta"
    assert sandbox.counts["openai.chat"] == 4  # a, b (cancelled mid-call), x, beta's y
    assert (left, pending, redelivered) == (0, 0, 0)
    assert "acme.doomed" in w.cancelled and "beta.doomed" not in w.cancelled and not w._calls


def test_recent_cancels_are_bounded_and_expire() -> None:
    r = Recent(ttl_s=60, max_entries=3)
    for k in "abcd":
        r.add(k)
    assert "a" not in r and all(k in r for k in "bcd") and len(r) == 3
    r.ttl_s = 0.0
    assert "d" not in r and len(r) == 0
