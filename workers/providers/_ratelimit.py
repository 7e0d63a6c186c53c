"""Provider rate-limit headers -> RateLimits with absolute epoch-millisecond resets.

OpenAI says *how long* until a window resets, as a Go duration ("6m0s", "1m30.5s", "20ms");
Anthropic says *when*, as an RFC 3339 timestamp. The router compares resets across workers and
providers, so both become absolute epoch ms here, once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import datetime

from ._base import RateLimits

# Go's time.Duration.String() units; "us"/"µs" both appear in the wild.
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go duration string ("1h2m3s", "250ms", "6m0s"); None if it is not one.

    A bare number is taken as seconds, because some OpenAI-compatible servers send "1" or "0.5".
    """
    s = text.strip()
    if not s:
        return None
    try:
        return max(0.0, float(s))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _GO_PART.finditer(s):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(s) else None


def format_go_duration(seconds: float) -> str:
    """The Go form of a duration, as OpenAI sends it: "1s", "6m0s", "20ms", "1h2m3s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}us"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    out = f"{int(h)}h" if h else ""
    if h or m:
        out += f"{int(m)}m"
    return out + f"{round(s, 3):g}s"


def parse_rfc3339_ms(text: str) -> int | None:
    """Epoch ms of an RFC 3339 timestamp ("2025-01-02T03:04:05Z"); None if unparsable."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:  # RFC 3339 requires an offset; a naive one is taken as UTC
        return None
    return int(dt.timestamp() * 1000)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return int(float(value))
    except ValueError:
        return None


def _present(limits: RateLimits) -> RateLimits | None:
    fields = (
        limits.remaining_requests,
        limits.remaining_tokens,
        limits.reset_requests_at_ms,
        limits.reset_tokens_at_ms,
    )
    return limits if any(v is not None for v in fields) else None


_DURATIONS: dict[str, int | None] = {}  # Go duration text -> ms: a few distinct values recur


def _duration_ms(raw: str) -> int | None:
    ms = _DURATIONS.get(raw, -1)
    if ms == -1:
        secs = parse_go_duration(raw)
        ms = None if secs is None else round(secs * 1000)
        if len(_DURATIONS) >= 4096:
            _DURATIONS.clear()
        _DURATIONS[raw] = ms
    return ms


def parse_openai(headers: Mapping[str, str], now_ms: int | None = None) -> RateLimits | None:
    """`x-ratelimit-remaining-*` and `x-ratelimit-reset-*` (Go durations from now)."""
    get = headers.get
    rem_req = get("x-ratelimit-remaining-requests")
    rem_tok = get("x-ratelimit-remaining-tokens")
    reset_req = get("x-ratelimit-reset-requests")
    reset_tok = get("x-ratelimit-reset-tokens")
    if rem_req is None and rem_tok is None and reset_req is None and reset_tok is None:
        return None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    req_ms = _duration_ms(reset_req) if reset_req is not None else None
    tok_ms = _duration_ms(reset_tok) if reset_tok is not None else None
    return _present(
        RateLimits(
            remaining_requests=_int(rem_req),
            remaining_tokens=_int(rem_tok),
            reset_requests_at_ms=None if req_ms is None else now + req_ms,
            reset_tokens_at_ms=None if tok_ms is None else now + tok_ms,
        )
    )


def parse_anthropic(headers: Mapping[str, str]) -> RateLimits | None:
    """`anthropic-ratelimit-{requests,tokens}-{remaining,reset}` (reset is RFC 3339)."""

    def reset(name: str) -> int | None:
        raw = headers.get(name)
        return parse_rfc3339_ms(raw) if raw is not None else None

    return _present(
        RateLimits(
            remaining_requests=_int(headers.get("anthropic-ratelimit-requests-remaining")),
            remaining_tokens=_int(headers.get("anthropic-ratelimit-tokens-remaining")),
            reset_requests_at_ms=reset("anthropic-ratelimit-requests-reset"),
            reset_tokens_at_ms=reset("anthropic-ratelimit-tokens-reset"),
        )
    )


def parse_gemini(headers: Mapping[str, str]) -> RateLimits | None:
    """Gemini sends no rate-limit headers; quota shows up only as 429s."""
    return None


PARSERS = {"openai": parse_openai, "anthropic": parse_anthropic, "gemini": parse_gemini}


def parse_limits(provider: str, headers: Mapping[str, str]) -> RateLimits | None:
    parser = PARSERS.get(provider)
    return parser(headers) if parser is not None else None
