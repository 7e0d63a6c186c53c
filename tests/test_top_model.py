"""`chainyard top`'s model alone: messages in (as NATS holds them), a Snapshot out."""

from __future__ import annotations

from chainyard.contracts import (
    ChainCompleted,
    ChainFailed,
    ChainState,
    DeploymentHealth,
    ErrorInfo,
    Heartbeat,
    Output,
    StepCompleted,
    StepFailed,
    Target,
    Usage,
    encode,
)
from chainyard.top import PANES, plain, table_rows
from chainyard.top_model import DAY_MS, MINUTE_MS, WINDOW_MS, Feed

NOW = 1_765_000_000_000 // DAY_MS * DAY_MS + 12 * 3_600_000  # noon UTC
T = Target(deployment="fast-d", pool="fast", provider="openai", model="m")


def done(tenant: str, chain: str, latency: float, cost: float, target: Target = T) -> bytes:
    return encode(
        StepCompleted(
            chain_id=chain, step_id="s", attempt=1, tenant=tenant, output=Output(text="x"),
            usage=Usage(input_tokens=10, output_tokens=5), cost_usd=cost, target=target,
            worker="w", dispatched_at_ms=0, started_at_ms=0, latency_ms=latency,
        )
    )  # fmt: skip


def failed(tenant: str, chain: str, message: str) -> bytes:
    return encode(
        StepFailed(
            chain_id=chain, step_id="s", attempt=1, tenant=tenant, target=T, worker="w",
            error=ErrorInfo(cls="retryable", message=message, status=503),
        )
    )  # fmt: skip


def beat(worker: str, free: int, at_ms: int = NOW, remaining: int | None = None) -> bytes:
    health = DeploymentHealth(remaining_requests=remaining, remaining_tokens=remaining)
    return encode(
        Heartbeat(
            pool="fast", worker=worker, slots_total=8, slots_free=free, at_ms=at_ms,
            interval_ms=2000, deployments={"fast-d": health},
        )
    )  # fmt: skip


def test_pools_latency_errors_breakers_and_headroom() -> None:
    f = Feed()
    f.on_heartbeat("fast.w1", beat("w1", 3, remaining=900))
    f.on_heartbeat("fast.w2", beat("w2", 8, remaining=2500))
    f.on_heartbeat("fast.gone", beat("gone", 8, at_ms=NOW - 60_000))  # stale: not counted
    f.on_queue("fast", 7, 5)
    f.on_queue("idle", 0, 0)  # a consumer without workers still shows
    for i in range(1, 101):
        f.on_event(f"cy.events.acme.c{i}.step.completed", done("acme", f"c{i}", i, 0.01), NOW)
    f.on_event("cy.events.acme.x.step.failed", failed("acme", "x", "provider down"), NOW)
    f.on_breaker("fast-d", b'{"status": "half_open", "reason": "3 failures"}')
    snap = f.snapshot(NOW)
    fast, idle = snap.pools
    assert (fast.pool, fast.workers, fast.slots_free, fast.slots_total) == ("fast", 2, 11, 16)
    assert (fast.queued, fast.in_flight) == (7, 5)
    assert (fast.p50_ms, fast.p95_ms) == (50, 95)
    assert fast.error_rate == 1 / 101
    assert fast.breaker == "half_open" and fast.headroom == "900 req 900 tok"
    assert (idle.pool, idle.workers, idle.p50_ms, idle.error_rate, idle.headroom) == (
        "idle",
        0,
        None,
        None,
        "-",
    )
    f.on_heartbeat("fast.w1", None)  # deleted
    assert f.snapshot(NOW).pools[0].workers == 1


def test_deployments_per_minute_and_the_window() -> None:
    f = Feed()
    other = Target(deployment="big-d", pool="big", provider="openai", model="b")
    f.on_event("cy.events.a.c1.step.completed", done("a", "c1", 5, 1.0), NOW - 2 * MINUTE_MS)
    f.on_event("cy.events.a.c2.step.completed", done("a", "c2", 5, 0.5), NOW - 1000)
    f.on_event("cy.events.a.c3.step.completed", done("a", "c3", 5, 0.25, other), NOW)
    deps = {d.deployment: d for d in f.snapshot(NOW).deployments}
    assert (deps["fast-d"].calls_per_min, deps["fast-d"].cost_per_min) == (1, 0.5)
    assert deps["fast-d"].tokens_per_min == 15 and deps["big-d"].pool == "big"
    later = f.snapshot(NOW + WINDOW_MS + 1)  # everything has left the windows
    assert all(d.calls_per_min == 0 for d in later.deployments)
    assert all(p.p50_ms is None for p in later.pools)


def test_tenants_running_and_spend_today_and_failures() -> None:
    f = Feed()
    running = b'{"status": "running", "tenant": "acme"}'
    f.on_chain("acme.c1", running)
    f.on_chain("acme.c2", running)
    f.on_chain("globex.c1", running)
    f.on_chain("acme.c2", b'{"status": "completed"}')
    f.on_chain("globex.c1", None)  # purged
    f.on_event("cy.events.acme.c0.step.completed", done("acme", "c0", 5, 0.5), NOW - DAY_MS)
    f.on_event("cy.events.acme.c2.step.completed", done("acme", "c2", 5, 0.25), NOW)
    f.on_event("cy.events.acme.c2.step.completed", done("acme", "c2", 5, 0.5), NOW)
    f.on_event("cy.events.globex.c1.step.completed", done("globex", "c1", 5, 1.0), NOW)
    end = ChainCompleted(chain_id="c2", tenant="acme", output=Output())
    f.on_event("cy.events.acme.c2.chain.completed", encode(end), NOW)
    bad = ChainFailed(chain_id="c9", tenant="globex", reason="budget exceeded", step_id="s")
    f.on_event("cy.events.globex.c9.chain.failed", encode(bad), NOW + 1)
    f.on_event("cy.events.globex.c9.step.completed", b"{not json", NOW + 2)  # skipped
    f.on_event("elsewhere.events.globex.c9.chain.failed", encode(bad), NOW + 3)  # not ours
    snap = f.snapshot(NOW + 10)
    tenants = {t.tenant: t for t in snap.tenants}
    assert (tenants["acme"].running, tenants["acme"].chains_today) == (1, 1)
    assert tenants["acme"].spend_today == 0.75  # yesterday's 0.5 is not today's
    assert (tenants["globex"].running, tenants["globex"].spend_today) == (0, 1.0)
    assert tenants["globex"].chains_today == 1 and tenants["acme"].tokens_today == 30
    (fail,) = snap.failures
    assert (fail.tenant, fail.chain_id, fail.where, fail.reason) == (
        "globex",
        "c9",
        "chain (s)",
        "budget exceeded",
    )
    # a new day: today's counts start again, running chains stay
    tomorrow = f.snapshot(NOW + DAY_MS)
    assert {t.tenant: (t.running, t.spend_today) for t in tomorrow.tenants} == {"acme": (1, 0.0)}


def test_rows_sort_and_print() -> None:
    f = Feed()
    for tenant, cost in (("b", 0.2), ("a", 0.1), ("c", 0.3)):
        f.on_event(f"cy.events.{tenant}.c.step.completed", done(tenant, "c", 1, cost), NOW)
    snap = f.snapshot(NOW)
    tenants = next(p for p in PANES if p.id == "tenants")
    spend_col = [c.label for c in tenants.columns].index("spend today")
    assert [r[0] for r in table_rows(tenants, snap, None, False)] == ["a", "b", "c"]
    assert [r[0] for r in table_rows(tenants, snap, spend_col, True)] == ["c", "b", "a"]
    text = plain(snap)
    assert "tenants (today, UTC):" in text and "$0.3000" in text
    assert ChainState  # the KV value's type: on_chain reads its `status` only
