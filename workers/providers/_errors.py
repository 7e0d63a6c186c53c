"""One error taxonomy for every provider: HTTP status, body and transport failures -> ProviderError.

The router only acts on `ProviderError.cls`: retryable (try again or elsewhere), fatal (the request
itself is wrong), context_window (a deployment with a larger window may take it). Every adapter
goes through `error_from_response` and `boundary`, so the rules live in this file only.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec

from chainyard.contracts import ErrorClass

from ._base import ProviderError, RateLimits
from ._http import HttpClient, HttpError, HttpTimeout, ResponseTooLarge
from ._ratelimit import parse_go_duration, parse_limits

_RETRYABLE_4XX = frozenset({408, 409, 425, 429})

# How each provider says "the prompt does not fit"; codes first, then message text, because
# OpenAI-compatible servers (vLLM, llama.cpp, Ollama) rarely send OpenAI's code.
_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_PATTERNS = re.compile(
    r"prompt is too long"  # Anthropic
    r"|maximum context length"  # OpenAI, vLLM
    r"|context[ _-]?(?:length|window)[^.]{0,40}exceed"
    r"|exceeds? (?:the )?(?:model'?s? )?context"
    r"|input token count[^.]{0,40}exceeds"  # Gemini
    r"|exceeds the maximum number of tokens"
    r"|too many tokens in (?:the )?prompt",
    re.IGNORECASE,
)
_MAX_MESSAGE = 500  # provider messages go into events; keep them short
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Remove every secret (the API key) from text that may end up in an event or a log."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def classify_status(status: int) -> ErrorClass:
    if status in _RETRYABLE_4XX or status >= 500:
        return "retryable"
    return "fatal"


def is_context_window(code: str | None, message: str) -> bool:
    return (code is not None and code in _CONTEXT_CODES) or bool(_CONTEXT_PATTERNS.search(message))


def parse_retry_after(headers: Mapping[str, str], now_s: float | None = None) -> float | None:
    """Seconds to wait: `retry-after-ms` wins (finer), then `retry-after` (seconds or HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)


def _body_fields(body: bytes) -> tuple[str | None, str | None, Any]:
    """(code, message, details) from OpenAI, Anthropic and Gemini error bodies, or plain text."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        text = body.decode("utf-8", "replace").strip()
        return None, text or None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        # OpenAI: {"error": {"message", "type", "param", "code"}}
        # Anthropic: {"type": "error", "error": {"type", "message"}}
        # Gemini: {"error": {"code": 429, "message", "status", "details"}}
        code = err.get("code")
        code = code if isinstance(code, str) else err.get("status") or err.get("type")
        message = err.get("message")
        return (
            str(code) if code is not None else None,
            str(message) if message is not None else None,
            err.get("details"),
        )
    if isinstance(err, str):  # vLLM / Ollama sometimes send {"error": "text"}
        return None, err, None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return None, data["message"], None
    return None, None, None


def _gemini_retry_delay(details: Any) -> float | None:
    """Gemini puts the wait in a google.rpc.RetryInfo detail ("retryDelay": "7s")."""
    if not isinstance(details, list):
        return None
    for d in details:
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("RetryInfo"):
            delay = d.get("retryDelay")
            if isinstance(delay, str):
                return parse_go_duration(delay)
    return None


def error_from_response(
    provider: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    secrets: tuple[str, ...] = (),
) -> ProviderError:
    """Classify an HTTP error response; carries retry-after and the rate limits it reported."""
    code, message, details = _body_fields(body)
    text = message or f"HTTP {status}"
    cls: ErrorClass = classify_status(status)
    if status in (400, 413, 422) and is_context_window(code, text):
        cls = "context_window"
    retry_after = parse_retry_after(headers)
    if retry_after is None:
        retry_after = _gemini_retry_delay(details)
    limits: RateLimits | None = parse_limits(provider, headers)
    prefix = f"{provider} {status}" + (f" {code}" if code else "")
    return ProviderError(
        cls,
        scrub(f"{prefix}: {text}", secrets)[:_MAX_MESSAGE],  # scrubbed whole: a key across the cut
        status=status,
        retry_after_s=retry_after,
        limits=limits,
    )


def malformed(provider: str, detail: str, secrets: tuple[str, ...] = ()) -> ProviderError:
    """A 2xx the adapter cannot read: a provider glitch, so worth another attempt."""
    return ProviderError(
        "retryable", scrub(f"{provider}: malformed response: {detail}", secrets)[:_MAX_MESSAGE]
    )


class boundary:  # lowercase: used as a function, `with boundary(provider, secrets):`
    """Turn every failure inside into ProviderError, so `complete` raises nothing else.

    Raised `from None`: a chained client exception may carry the request, whose headers hold the
    key.
    A class, not a @contextmanager: it is entered twice a provider call, and a generator-based
    one costs several times more.
    """

    __slots__ = ("provider", "secrets")

    def __init__(self, provider: str, secrets: tuple[str, ...] = ()) -> None:
        self.provider = provider
        self.secrets = secrets

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, ProviderError) or not isinstance(exc, Exception):
            return False
        provider, secrets = self.provider, self.secrets
        if isinstance(exc, HttpTimeout):
            msg = scrub(f"{provider}: timeout ({exc})", secrets)
            raise ProviderError("retryable", msg[:_MAX_MESSAGE]) from None
        if isinstance(exc, ResponseTooLarge):  # a fault of that server: another may answer
            msg = scrub(f"{provider}: response too large ({exc})", secrets)
            raise ProviderError("retryable", msg[:_MAX_MESSAGE]) from None
        if isinstance(exc, HttpError):  # connect refused, reset, closed before the answer
            msg = scrub(f"{provider}: connection error ({exc})", secrets)
            raise ProviderError("retryable", msg[:_MAX_MESSAGE]) from None
        if isinstance(
            exc, msgspec.DecodeError | msgspec.ValidationError | KeyError | TypeError | ValueError
        ):
            raise malformed(provider, f"{type(exc).__name__}: {exc}", secrets) from None
        return False


async def post_json(
    client: HttpClient,
    provider: str,
    path: str,
    body: dict[str, Any] | bytes,
    secrets: tuple[str, ...] = (),
    decoder: msgspec.json.Decoder[Any] | None = None,
) -> tuple[Any, Mapping[str, str]]:
    """POST a JSON body (or its encoded bytes); the decoded 2xx body (by `decoder` when given)
    and the case-insensitive response headers, or ProviderError."""
    content = body if isinstance(body, bytes) else _encode(body)
    with boundary(provider, secrets):
        status, headers, data = await client.post(path, content)
        if status >= 400:
            raise error_from_response(provider, status, headers, data, secrets)
        return (_decode(data) if decoder is None else decoder.decode(data)), headers


async def iter_sse(
    client: HttpClient,
    provider: str,
    path: str,
    body: dict[str, Any],
    secrets: tuple[str, ...] = (),
    on_headers: Any = None,
) -> AsyncIterator[Any]:
    """POST and yield each SSE `data:` payload decoded as JSON; stops at OpenAI's `[DONE]`.

    Only `data:` lines are read: all three providers repeat the event type inside the JSON.
    `on_headers` receives the response headers once (they carry the rate limits).
    """
    with boundary(provider, secrets):
        async with client.stream(path, msgspec.json.encode(body)) as resp:
            if resp.status >= 400:
                data = await resp.read()
                raise error_from_response(provider, resp.status, resp.headers, data, secrets)
            if on_headers is not None:
                on_headers(resp.headers)
            async for line in resp.lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                if payload:
                    yield msgspec.json.decode(payload)
