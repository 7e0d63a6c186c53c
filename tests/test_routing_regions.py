"""The region rule of routing (router/strategies.py `near_first`), pure and fast: no NATS.

A router prefers deployments whose pool is in its own region (or has no region) unless one
elsewhere is cheaper by more than `[router] cross_region_margin`, or its region has no free
slot and another has; a local deployment that is not eligible (no live workers, breaker open,
tried already) leaves the others: that is the failover across regions.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from chainyard.cli import Fail, _config, parser
from chainyard.contracts import (
    Config,
    ConfigError,
    Deployment,
    LlmStep,
    Message,
    Params,
    PoolConfig,
    Price,
    RouterConfig,
    load_config,
)
from chainyard.router.breakers import Breaker, Breakers
from chainyard.router.capacity import CapacityView, PoolLoad
from chainyard.router.catalog import Catalog
from chainyard.router.policy import Ctx, NoCapacity, Policy, far_deployments
from chainyard.router.strategies import near_first

T = 1_000_000


def world(
    prices: dict[str, float],
    *,
    here: str | None = "eu",
    regions: dict[str, str | None] | None = None,
    margin: float = 0.2,
    strategy: str = "balanced",
) -> tuple[Policy, CapacityView, Breakers]:
    """One deployment of model `m` per pool; pool `p` is in region `p` unless `regions` says."""
    regions = regions or {}
    cfg = Config(
        strategy=strategy,  # type: ignore[arg-type]
        deployments=[
            Deployment(
                name=f"d-{p}",
                pool=p,
                model="m",
                price=Price(input_per_mtok=usd, output_per_mtok=usd),
            )
            for p, usd in prices.items()
        ],
        pools=[PoolConfig(name=p, region=regions.get(p, p)) for p in prices],
        router=RouterConfig(region=here, cross_region_margin=margin),
    )
    cap = CapacityView(None)  # type: ignore[arg-type]
    for p in prices:
        cap._seen_pools.add(p)
        cap.pools[p] = PoolLoad(live_until_ms=T + 10_000, slots_total=1000, slots_free=1000)
    brk = Breakers(None, cfg)  # type: ignore[arg-type]
    return Policy(Catalog(cfg, cap.seen), cap, cfg, brk, random.Random(7)), cap, brk


def step() -> LlmStep:
    return LlmStep(
        id="s",
        model="m",
        messages=[Message(role="user", content="hi")],
        params=Params(max_tokens=8),
    )


def picks(policy: Policy, n: int = 60, exclude: list[str] | None = None) -> Counter[str]:
    """What the fast path and the reference loop pick, n times each (they must agree)."""
    out: Counter[str] = Counter()
    for _ in range(n):
        for choose in (policy.choose, policy._choose_slow):
            got = choose(step(), exclude or [], Ctx(now_ms=T))
            out[got if isinstance(got, str) else got[0].name] += 1
    return out


def test_near_first_keeps_the_near_unless_far_is_much_cheaper_or_near_is_full() -> None:
    far = [False, True, True]
    assert near_first(far, [1.0, 1.0, 1.0], [5, 5, 5], 0.2) == [0]
    assert near_first(far, [1.0, 0.85, 0.5], [5, 5, 5], 0.2) == [0, 2]  # 50 % cheaper only
    assert near_first(far, [1.0, 0.5, 0.5], [5, 5, 5], 0.0) is None  # all kept: no narrowing
    assert near_first(far, [0.0, 0.0, 0.0], [5, 5, 5], 0.2) == [0]  # free beats free: stay
    assert near_first(far, [1.0, 1.0, 1.0], [0, 3, 0], 0.2) is None  # home is full
    assert near_first(far, [1.0, 1.0, 1.0], [0, 0, 0], 0.2) == [0]  # full everywhere: stay
    assert near_first([True, True], [1.0, 2.0], [1, 1], 0.2) is None  # nothing near
    assert near_first([False, False], [1.0, 2.0], [1, 1], 0.2) is None  # nothing far


def test_far_deployments_come_from_the_pools_regions() -> None:
    policy, _, _ = world({"eu": 1.0, "us": 1.0, "any": 1.0}, regions={"any": None})
    assert far_deployments(policy.config) == {"d-us"}
    policy, _, _ = world({"eu": 1.0, "us": 1.0}, here=None)
    assert far_deployments(policy.config) == frozenset()  # a router without a region


@pytest.mark.parametrize("strategy", ["cheapest", "fastest", "balanced", "weighted"])
def test_router_stays_in_its_region_at_equal_cost(strategy: str) -> None:
    policy, _, _ = world({"eu": 1.0, "us": 1.0, "ap": 1.0}, strategy=strategy)
    assert picks(policy) == {"d-eu": 120}


def test_pool_without_region_is_near_every_router() -> None:
    policy, _, _ = world({"eu": 1.0, "us": 1.0, "global": 1.0}, regions={"global": None})
    got = picks(policy, 200)
    assert set(got) == {"d-eu", "d-global"}, got


def test_router_without_region_spreads_over_all_regions() -> None:
    policy, _, _ = world({"eu": 1.0, "us": 1.0, "ap": 1.0}, here=None)
    assert set(picks(policy, 200)) == {"d-eu", "d-us", "d-ap"}


def test_much_cheaper_elsewhere_wins_a_little_cheaper_does_not() -> None:
    policy, _, _ = world({"eu": 1.0, "us": 0.9}, strategy="cheapest")  # 10 % < 20 %
    assert picks(policy) == {"d-eu": 120}
    policy, _, _ = world({"eu": 1.0, "us": 0.5}, strategy="cheapest")  # 50 % > 20 %
    assert picks(policy) == {"d-us": 120}
    policy, _, _ = world({"eu": 1.0, "us": 0.9}, strategy="cheapest", margin=0.05)
    assert picks(policy) == {"d-us": 120}


def test_full_region_spills_to_one_with_room() -> None:
    policy, cap, _ = world({"eu": 1.0, "us": 1.0, "ap": 1.0})
    cap.pools["eu"].slots_free = 0
    cap.pools["ap"].slots_free = 0
    assert picks(policy, 10) == {"d-us": 20}
    cap.pools["us"].slots_free = 0  # full everywhere: wait in the home queue
    assert picks(policy, 10) == {"d-eu": 20}


def test_fails_over_across_regions_when_home_has_no_workers_or_breaker_is_open() -> None:
    policy, cap, brk = world({"eu": 1.0, "us": 1.0})
    cap.pools["eu"].live_until_ms = T - 1  # the region's workers are gone (or cut off)
    cap.version += 1
    assert picks(policy) == {"d-us": 120}
    policy, cap, brk = world({"eu": 1.0, "us": 1.0})
    brk._set("d-eu", Breaker(status="open", open_until_ms=T + 5_000, at_ms=T))
    assert picks(policy) == {"d-us": 120}
    policy, _, _ = world({"eu": 1.0, "us": 1.0})
    assert picks(policy, exclude=["d-eu"]) == {"d-us": 120}  # a retry after a failure at home


def test_no_region_left_is_a_reason_to_wait() -> None:
    policy, cap, _ = world({"eu": 1.0, "us": 1.0})
    for p in ("eu", "us"):
        cap.pools[p].live_until_ms = T - 1
    cap.version += 1
    got = policy.choose(step(), [], Ctx(now_ms=T))
    assert isinstance(got, NoCapacity) and "no live workers in pool us" in got, got


def test_region_from_flag_env_or_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chainyard.toml"
    path.write_text('[router]\nregion = "eu"\n\n[[pools]]\nname = "p"\nregion = "us"\n')
    assert load_config(path).pools[0].region == "us"
    args = parser().parse_args(["router", "--config", str(path)])
    assert _config(args).router.region == "eu"
    args = parser().parse_args(["router", "--config", str(path), "--region", "ap"])
    assert _config(args).router.region == "ap"
    monkeypatch.setenv("CHAINYARD_REGION", "us")
    args = parser().parse_args(["router", "--config", str(path)])
    assert _config(args).router.region == "us"
    args = parser().parse_args(["router", "--config", str(path), "--region", "no spaces"])
    with pytest.raises(Fail) as e:
        _config(args)
    assert e.value.code == 2 and "--region 'no spaces'" in str(e.value)


def test_bad_region_in_the_config_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "chainyard.toml"
    path.write_text("[router]\ncross_region_margin = 2.0\n")
    with pytest.raises(ConfigError, match=r"\$\.router\.cross_region_margin = 2\.0"):
        load_config(path)
    path.write_text('[[pools]]\nname = "p"\nregion = "eu west"\n')
    with pytest.raises(ConfigError, match=r"\$\.pools\[0\]\.region = 'eu west'"):
        load_config(path)
