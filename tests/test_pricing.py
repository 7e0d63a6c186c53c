"""Pricer: genai-prices table, per-deployment overrides, unknown models."""

from __future__ import annotations

import pytest

from chainyard.contracts import Usage
from chainyard.workers.pricing import PriceOverride, Pricer

MTOK = Usage(input_tokens=1_000_000, output_tokens=1_000_000)


def test_table_price_gpt_4o_mini() -> None:
    q = Pricer().price("openai", "gpt-4o-mini", MTOK)
    assert (q.priced, q.source) == (True, "table")
    assert q.usd == pytest.approx(0.15 + 0.60)  # USD per MTok, input + output


def test_fast_path_matches_calc_price() -> None:
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price

    u = Usage(input_tokens=1234, output_tokens=567)
    want = calc_price(GUsage(input_tokens=1234, output_tokens=567), "gpt-4o", provider_id="openai")
    p = Pricer()
    assert p.cost("openai", "gpt-4o", u) == pytest.approx(float(want.total_price))
    assert p.cost("openai", "gpt-4o", u) == pytest.approx(float(want.total_price))  # cached


def test_tiered_price_goes_through_table() -> None:
    # Gemini 2.5 Pro is priced in tiers (above 200k prompt tokens): the slow path handles it
    small = Pricer().price("gemini", "gemini-2.5-pro", Usage(input_tokens=1000))
    big = Pricer().price("gemini", "gemini-2.5-pro", Usage(input_tokens=300_000))
    assert small.priced and big.priced
    assert big.usd / 300 > small.usd  # higher rate per token above the tier


def test_override_wins() -> None:
    p = Pricer({"local-llama": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}})
    q = p.price("openai", "gpt-4o-mini", MTOK, deployment="local-llama")
    assert (q.usd, q.source) == (3.0, "override")
    explicit = p.price("openai", "gpt-4o-mini", MTOK, PriceOverride(input_per_mtok=0.5))
    assert explicit.usd == 0.5
    assert p.cost("openai", "gpt-4o-mini", MTOK) == pytest.approx(0.75)  # no override: table


def test_unknown_model_is_unpriced() -> None:
    p = Pricer()
    q = p.price("openai", "my-finetune-that-does-not-exist", MTOK)
    assert (q.usd, q.priced, q.source) == (0.0, False, "unpriced")
    assert not p.is_priced("openai", "my-finetune-that-does-not-exist")
    assert p.price("no-such-provider", "gpt-4o-mini", MTOK).priced is False
