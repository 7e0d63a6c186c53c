"""USD cost of a model call: per-deployment overrides first, then the genai-prices table.

genai-prices' `calc_price` walks its provider and model tables on every call (~0.3 ms); a worker
prices every step, so the model's price is resolved once per (provider, model) and simple
per-token prices are then applied here directly. Tiered or per-request prices (e.g. Gemini's
long-context tier) keep going through `calc_price`, which is still correct, just slower.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Literal

from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price
from msgspec import Struct

from chainyard.contracts import Usage

# Our provider names -> genai-prices provider ids.
_PROVIDER_IDS = {
    "gemini": "google",
    "google": "google",
    "openai": "openai",
    "anthropic": "anthropic",
}
_REFRESH_S = 3600.0  # prices can change by date (conditional prices); re-resolve hourly
_MTOK = 1_000_000


class PriceOverride(Struct, frozen=True, kw_only=True):
    """USD per million tokens for one deployment (self-hosted models, negotiated prices)."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


class Quote(Struct, frozen=True, kw_only=True):
    usd: float
    priced: bool  # False: no override and the table does not know the model; usd is 0.0
    source: Literal["override", "table", "unpriced"]


class _Entry(Struct, frozen=True):
    at: float
    # (input, output) USD per token when the table price is flat; None: use calc_price
    flat: tuple[float, float] | None
    known: bool


def _per_mtok(override: Any) -> tuple[float, float]:
    if isinstance(override, Mapping):
        return float(override.get("input_per_mtok", 0.0)), float(
            override.get("output_per_mtok", 0.0)
        )
    return float(override.input_per_mtok), float(override.output_per_mtok)


class Pricer:
    """Prices (provider, model, Usage). Thread-unsafe by design: one per event loop is enough.

    `overrides` maps a deployment name (or, failing that, a model name) to its price, as a
    PriceOverride, contracts' config Price, or a dict {input_per_mtok, output_per_mtok}.
    """

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self._overrides = {k: _per_mtok(v) for k, v in (overrides or {}).items()}
        self._cache: dict[tuple[str, str], _Entry] = {}

    def price(
        self,
        provider: str,
        model: str,
        usage: Usage,
        override: Any = None,
        *,
        deployment: str | None = None,
    ) -> Quote:
        """The cost of one call. An explicit `override` wins, then the deployment's, then the
        model's entry in `overrides`, then the genai-prices table."""
        rates = _per_mtok(override) if override is not None else None
        if rates is None and deployment is not None:
            rates = self._overrides.get(deployment)
        if rates is None:
            rates = self._overrides.get(model)
        if rates is not None:
            usd = (usage.input_tokens * rates[0] + usage.output_tokens * rates[1]) / _MTOK
            return Quote(usd=usd, priced=True, source="override")
        entry = self._entry(provider, model)
        if not entry.known:
            return Quote(usd=0.0, priced=False, source="unpriced")
        if entry.flat is not None:
            usd = usage.input_tokens * entry.flat[0] + usage.output_tokens * entry.flat[1]
            return Quote(usd=usd, priced=True, source="table")
        usd = float(self._calc(provider, model, usage).total_price)
        return Quote(usd=usd, priced=True, source="table")

    def cost(
        self, provider: str, model: str, usage: Usage, override: Any = None, **kw: Any
    ) -> float:
        """`price(...).usd`: for callers that only want the number."""
        return self.price(provider, model, usage, override, **kw).usd

    def is_priced(self, provider: str, model: str) -> bool:
        return model in self._overrides or self._entry(provider, model).known

    def _calc(self, provider: str, model: str, usage: Usage) -> Any:
        # No guessing across providers: a self-hosted model on an OpenAI-compatible server must
        # not be priced as some cloud's model of the same name; give it an override instead.
        pid = _PROVIDER_IDS.get(provider.lower(), provider.lower())
        u = GenaiUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
        return calc_price(u, model, provider_id=pid)

    def _entry(self, provider: str, model: str) -> _Entry:
        key = (provider, model)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None and now - entry.at < _REFRESH_S:
            return entry
        try:
            # A zero-usage probe: it resolves the model and returns its current price set.
            mp = self._calc(provider, model, Usage()).model_price
        except LookupError:
            entry = _Entry(now, None, False)
        else:
            inp, out = getattr(mp, "input_mtok", None), getattr(mp, "output_mtok", None)
            simple = all(isinstance(v, Decimal | None) for v in (inp, out)) and (
                getattr(mp, "requests_kcount", None) is None
            )
            flat = (float(inp or 0) / _MTOK, float(out or 0) / _MTOK) if simple else None
            entry = _Entry(now, flat, True)
        self._cache[key] = entry
        return entry
