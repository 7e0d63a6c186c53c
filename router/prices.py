"""Per-token prices for routing: the deployment's configured price, else the genai-prices table.

The router must not import workers, so this is a small re-implementation of the lookup the
workers' Pricer does: one zero-usage `calc_price` probe per (provider, model), cached. Tiered
prices are read at their base tier (routing needs an estimate, the worker bills exactly).
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache

from chainyard.contracts import Deployment

_PROVIDER_IDS = {
    "gemini": "google",
    "google": "google",
    "openai": "openai",
    "anthropic": "anthropic",
}
_MTOK = 1_000_000


@lru_cache(maxsize=4096)
def table_price(provider: str, model: str) -> tuple[float, float] | None:
    """(input, output) USD per token from genai-prices, or None when the table has no such model."""
    try:
        from genai_prices import Usage, calc_price

        pid = _PROVIDER_IDS.get(provider.lower(), provider.lower())
        mp = calc_price(Usage(input_tokens=0, output_tokens=0), model, provider_id=pid).model_price
    except Exception:  # LookupError for unknown models; anything else: treat as unpriced
        return None

    def flat(v: object) -> float:
        if isinstance(v, Decimal | int | float):
            return float(v)
        tiers = getattr(v, "base", None)  # TieredPrices: the base tier
        return float(tiers) if isinstance(tiers, Decimal | int | float) else 0.0

    return flat(getattr(mp, "input_mtok", 0) or 0) / _MTOK, flat(
        getattr(mp, "output_mtok", 0) or 0
    ) / _MTOK


def unit_prices(d: Deployment) -> tuple[float, float]:
    """USD per input and per output token; an unpriced model counts as free (and is logged by
    the worker's own pricing); the config's `price` always wins."""
    if d.price is not None:
        return d.price.input_per_mtok / _MTOK, d.price.output_per_mtok / _MTOK
    return table_price(d.provider, d.wire_model) or (0.0, 0.0)
