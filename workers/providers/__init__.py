"""Provider adapters: one module per provider API, one interface, one error taxonomy."""

from __future__ import annotations

from typing import Any

from ._base import Completion, LlmRequest, OnDelta, Provider, ProviderError, RateLimits
from ._errors import classify_status, is_context_window, parse_retry_after, scrub
from ._http import HttpSettings
from ._ratelimit import (
    format_go_duration,
    parse_anthropic,
    parse_go_duration,
    parse_limits,
    parse_openai,
)
from .anthropic import AnthropicProvider
from .gemini import GeminiProvider
from .openai import OpenAIProvider

# OpenAI-compatible servers are the OpenAI adapter at another base URL.
_OPENAI_COMPATIBLE = frozenset({"openai", "openai-compatible", "vllm", "ollama", "llamacpp"})


def make_provider(kind: str, base_url: str, api_key: str | None, **opts: Any) -> Provider:
    """The adapter for `kind` ("openai" | "vllm" | "ollama" | "llamacpp" | "openai-compatible" |
    "anthropic" | "gemini"). `opts` go to the adapter: timeout_s, http (HttpSettings: proxy, CA
    bundle, connection and response size bounds), headers, name, and
    max_completion_tokens (OpenAI), version / default_max_tokens (Anthropic), api_version (Gemini).
    """
    k = kind.lower()
    if k in _OPENAI_COMPATIBLE:
        return OpenAIProvider(base_url, api_key, **opts)
    if k == "anthropic":
        return AnthropicProvider(base_url, api_key, **opts)
    if k in ("gemini", "google"):
        return GeminiProvider(base_url, api_key, **opts)
    raise ValueError(f"unknown provider kind {kind!r}")


__all__ = [
    "AnthropicProvider",
    "Completion",
    "GeminiProvider",
    "HttpSettings",
    "LlmRequest",
    "OnDelta",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "RateLimits",
    "classify_status",
    "format_go_duration",
    "is_context_window",
    "make_provider",
    "parse_anthropic",
    "parse_go_duration",
    "parse_limits",
    "parse_openai",
    "parse_retry_after",
    "scrub",
]
