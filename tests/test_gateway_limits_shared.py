"""Per-key limits across gateway replicas (chainyard/gateway/limits.py): two `Limits`, each on
its own NATS connection as two replicas are, share one rpm, tpm and daily spend.

Tolerance (docs/GATEWAY.md, "Keys and limits"): the sum admitted never exceeds rpm; a replica
may refuse early by at most what the other replicas still hold in leases they took when much
of the minute was left (1/16 of what was left, at most 32; 3 of a 60 rpm)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest
from nats.aio.client import Client as NatsClient

from chainyard.gateway.keys import Grant
from chainyard.gateway.limits import Limits
from chainyard.runtime.server import NatsServer

NOON = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    """The wall clock both replicas read, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clock() -> Clock:
    return Clock(NOON + 15.0)  # 45 s before the minute ends


@pytest.fixture
async def replicas(nats_server: NatsServer, clock: Clock) -> AsyncIterator[list[Limits]]:
    ncs: list[NatsClient] = [await nats.connect(nats_server.url) for _ in range(2)]
    limits = [await Limits.open(nc.jetstream(), clock=clock) for nc in ncs]
    yield limits
    for lim in limits:
        await lim.stop()
    for nc in ncs:
        await nc.close()


async def caught_up(*limits: Limits) -> None:
    """Each replica has seen every counter write made so far (its watch's event, not a sleep)."""
    for lim in limits:
        revision = await lim.bucket_revision()
        await asyncio.wait_for(lim.until(lambda v, r=revision: v.revision >= r), 1.0)


async def test_two_replicas_share_one_rpm_exactly(replicas: list[Limits], clock: Clock) -> None:
    a, b = replicas
    grant = Grant(key_id="key_000000000001", tenant="t", rpm=60)
    admitted = {0: 0, 1: 0}
    refused: list[float] = []
    for i in range(200):  # requests alternate between the replicas, as a load balancer does
        wait = await replicas[i % 2].admit(grant, tokens_estimate=10)
        if wait is None:
            admitted[i % 2] += 1
        else:
            refused.append(wait)
    assert sum(admitted.values()) == 60
    assert admitted[0] >= 25 and admitted[1] >= 25  # both served, neither starved
    assert refused and all(w == pytest.approx(45.0) for w in refused)
    # another key is not touched by this one's minute
    other = Grant(key_id="key_000000000002", tenant="t", rpm=1)
    assert await b.admit(other, tokens_estimate=10) is None
    assert await a.admit(other, tokens_estimate=10) == pytest.approx(45.0)
    # the next minute frees it again
    clock.now = NOON + 60.5
    assert await a.admit(grant, tokens_estimate=10) is None
    assert await b.admit(grant, tokens_estimate=10) is None


async def test_rpm_with_many_in_flight_never_exceeds_and_refuses_early_within_tolerance(
    replicas: list[Limits],
) -> None:
    grant = Grant(key_id="key_000000000003", tenant="t", rpm=100)
    answers = await asyncio.gather(
        *(replicas[i % 2].admit(grant, tokens_estimate=1) for i in range(300))
    )
    admitted = sum(w is None for w in answers)
    assert 100 - 6 <= admitted <= 100  # 6: two leases of 100/16 left unused on the other side
    # whatever was held back is still admitted by the replica holding it, never more
    more = [await lim.admit(grant, tokens_estimate=1) for lim in replicas for _ in range(10)]
    assert admitted + sum(w is None for w in more) == 100


async def test_a_quiet_replica_holds_back_at_most_its_lease(replicas: list[Limits]) -> None:
    a, b = replicas
    grant = Grant(key_id="key_000000000004", tenant="t", rpm=60)
    assert await a.admit(grant, tokens_estimate=1) is None  # a leases 3 and uses 1
    by_b = 0
    while await b.admit(grant, tokens_estimate=1) is None:
        by_b += 1
    assert by_b == 57  # all but what a leased
    assert [await a.admit(grant, tokens_estimate=1) for _ in range(3)] == [None, None, 45.0]


async def test_tpm_counts_settled_tokens_across_replicas(
    replicas: list[Limits], clock: Clock
) -> None:
    a, b = replicas
    grant = Grant(key_id="key_000000000005", tenant="t", tpm=1000)
    # nothing used yet: even a request estimated over the whole limit goes (else never would)
    assert await b.admit(grant, tokens_estimate=5000) is None
    await a.settle(grant, tokens=600, cost_usd=0.0)
    await b.settle(grant, tokens=300, cost_usd=0.0)  # the other replica's: added, not lost
    await caught_up(a, b)
    for lim in (a, b):
        assert await lim.admit(grant, tokens_estimate=100) is None  # 900 + 100 fits
        assert await lim.admit(grant, tokens_estimate=101) == pytest.approx(45.0)
    await a.settle(grant, tokens=100, cost_usd=0.0)
    await caught_up(b)
    assert await b.admit(grant, tokens_estimate=1) == pytest.approx(45.0)
    clock.now = NOON + 59.0
    assert await b.admit(grant, tokens_estimate=1) == pytest.approx(1.0)
    clock.now = NOON + 60.0
    assert await b.admit(grant, tokens_estimate=900) is None


async def test_spend_per_day_counts_every_replicas_cost_until_utc_midnight(
    replicas: list[Limits], clock: Clock
) -> None:
    a, b = replicas
    grant = Grant(key_id="key_000000000006", tenant="t", spend_usd_per_day=1.0)
    clock.now = NOON + 11 * 3600  # 23:00 UTC
    # twenty requests end at once on both replicas: every cost is counted (compare-and-set)
    await asyncio.gather(
        *(replicas[i % 2].settle(grant, tokens=10, cost_usd=0.04) for i in range(20))
    )
    await caught_up(a, b)
    assert await a.admit(grant, tokens_estimate=1) is None  # 0.80 of 1.00 spent
    await b.settle(grant, tokens=10, cost_usd=0.25)
    await caught_up(a, b)
    for lim in (a, b):
        assert await lim.admit(grant, tokens_estimate=1) == pytest.approx(3600.0)
    clock.now = NOON + 12 * 3600  # midnight: a new day
    assert await a.admit(grant, tokens_estimate=1) is None


async def test_limits_combine_and_a_key_without_limits_never_touches_kv(
    replicas: list[Limits],
) -> None:
    a, _ = replicas
    before = await a.bucket_revision()
    free = Grant(key_id="key_000000000007", tenant="t")
    for _ in range(50):
        assert await a.admit(free, tokens_estimate=100) is None
    await a.settle(free, tokens=100, cost_usd=1.0)
    assert await a.bucket_revision() == before
    # spend refuses before rpm takes a request: a refused request costs no rpm allowance
    both = Grant(key_id="key_000000000008", tenant="t", rpm=2, spend_usd_per_day=0.01)
    await a.settle(both, tokens=1, cost_usd=0.02)
    assert await a.admit(both, tokens_estimate=1) is not None
    assert await a.bucket_revision() == before + 1  # the settle only
