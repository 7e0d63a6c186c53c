"""Shared sandbox machinery: configuration, fault injection, request capture and the echo model.

The sandbox answers deterministically so tests can assert exact text, usage and tool calls:
- text: "echo: <last message text>", cut to `max_tokens` words (finish "length" when cut);
- tokens: whitespace-separated words (input: every message, system and tool-result text);
- tool calls: tools are offered and the last message is a user turn containing
  "call <toolname>", optionally followed by a JSON object that becomes the arguments; every
  such occurrence is one call, in order of appearance (names not offered are ignored);
- JSON mode: a JSON object {"echo": "<last message text>"}, plus every `required` property of a
  given JSON schema filled with a value of its type.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter, deque
from typing import Any, Literal

import msgspec
from msgspec import Struct


class SandboxConfig(Struct, frozen=True, kw_only=True):
    """How the sandbox behaves; swap it live with `await SandboxServer.configure(...)`."""

    latency_ms: float = 0.0  # before every answer; for streams it is the time to first token
    chunk_delay_ms: float = 0.0  # between stream chunks
    error_rate: float = 0.0  # 0..1, drawn from random.Random(seed): same seed, same calls fail
    error_status: int = 500  # status of injected errors (400, 401, 404, 422, 500, 503, 529...)
    seed: int = 0
    rate_limit_every: int = 0  # every Nth call (1-based, counted across endpoints) gets a 429
    rate_limit_next: int = 0  # the next N calls after configure() get a 429
    rate_limit_for_s: float = 0.0  # every call in the T seconds after configure() gets a 429
    retry_after_s: float | None = 1.0  # `retry-after` on 429s (None: header absent)
    retry_after_ms: int | None = None  # `retry-after-ms` on 429s (None: header absent)
    limit_requests: int = 10_000
    limit_tokens: int = 2_000_000
    remaining_requests: int | None = None  # None: limit minus calls served so far
    remaining_tokens: int | None = None  # None: limit minus tokens served so far
    reset_requests_s: float = 1.0  # sent as Go duration (OpenAI) or RFC 3339 (Anthropic)
    reset_tokens_s: float = 360.0
    api_key: str | None = None  # when set, a request without exactly this key gets a 401
    dark: bool = False  # every call fails: a 503, or no listener at all (dark_mode "refuse")
    dark_mode: Literal["503", "refuse"] = "503"
    context_window: int = 0  # > 0: prompts with more input tokens get the context error
    capture: int = 64  # how many requests to keep in `captured` (0: none, for benchmarks)


class Captured(Struct, frozen=True, kw_only=True):
    """One request as received: for tests that assert the exact wire format."""

    endpoint: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any


class Fault(Struct, frozen=True, kw_only=True):
    status: int
    message: str
    kind: str  # "dark" | "auth" | "rate_limit" | "injected" | "context" | "bad_request"
    headers: dict[str, str] = {}


class Call(Struct, frozen=True):
    """One tool call of an answer."""

    name: str
    args: dict[str, Any] = {}


class Answer(Struct, frozen=True, kw_only=True):
    text: str = ""
    tool_calls: list[Call] = []
    finish: Literal["stop", "length", "tool"] = "stop"
    input_tokens: int = 0
    output_tokens: int = 0


class Turn(Struct, frozen=True, kw_only=True):
    """A provider-neutral view of one incoming message, enough for the echo model."""

    role: str  # "system" | "user" | "assistant" | "tool"
    text: str


class State:
    """Mutable server state: config, counters, the seeded RNG and the 429 windows."""

    def __init__(self, config: SandboxConfig) -> None:
        self.counts: Counter[str] = Counter()
        self.captured: deque[Captured] = deque(maxlen=max(config.capture, 1))
        self.calls = 0
        self.tokens_served = 0
        self.arrived: asyncio.Event | None = None  # set on every request, for tests to await
        self.apply(config)

    def apply(self, config: SandboxConfig) -> None:
        self.config = config
        self.captured = deque(self.captured, maxlen=max(config.capture, 1))
        self.rng = random.Random(config.seed)
        self.limited_left = config.rate_limit_next
        self.limited_until = time.monotonic() + config.rate_limit_for_s

    def record(self, endpoint: str, path: str, query: Any, headers: Any, body: Any) -> None:
        self.counts[endpoint] += 1
        self.calls += 1
        if self.arrived is not None:
            self.arrived.set()
        if self.config.capture > 0:
            self.captured.append(
                Captured(
                    endpoint=endpoint,
                    path=path,
                    query=dict(query),
                    headers={k.lower(): v for k, v in headers.items()},
                    body=body,
                )
            )

    async def gate(self, key: str | None) -> Fault | None:
        """Faults that do not depend on the request body, in the order a real service hits them."""
        c = self.config
        if c.dark:
            return Fault(status=503, message="The service is unavailable.", kind="dark")
        if c.latency_ms > 0:
            await asyncio.sleep(c.latency_ms / 1000)
        if c.api_key is not None and key != c.api_key:
            # Echo the key back, as providers partly do: tests check that adapters scrub it.
            return Fault(status=401, message=f"Incorrect API key provided: {key}.", kind="auth")
        if self._limited():
            headers: dict[str, str] = {}
            if c.retry_after_s is not None:
                headers["retry-after"] = f"{c.retry_after_s:g}"
            if c.retry_after_ms is not None:
                headers["retry-after-ms"] = str(c.retry_after_ms)
            return Fault(
                status=429,
                message="Rate limit reached for requests.",
                kind="rate_limit",
                headers=headers,
            )
        if c.error_rate > 0 and self.rng.random() < c.error_rate:
            return Fault(
                status=c.error_status,
                message=_MESSAGES.get(c.error_status, "Injected sandbox error."),
                kind="injected",
            )
        return None

    def _limited(self) -> bool:
        c = self.config
        if self.limited_left > 0:
            self.limited_left -= 1
            return True
        if c.rate_limit_for_s > 0 and time.monotonic() < self.limited_until:
            return True
        return c.rate_limit_every > 0 and self.calls % c.rate_limit_every == 0

    def too_long(self, input_tokens: int) -> bool:
        return 0 < self.config.context_window < input_tokens

    def remaining(self) -> tuple[int, int]:
        c = self.config
        req = c.remaining_requests
        tok = c.remaining_tokens
        return (
            max(0, c.limit_requests - self.calls) if req is None else req,
            max(0, c.limit_tokens - self.tokens_served) if tok is None else tok,
        )


_MESSAGES = {
    400: "Invalid request.",
    401: "Invalid API key provided.",
    403: "Permission denied.",
    404: "The model does not exist.",
    408: "Request timed out.",
    409: "Conflict.",
    422: "Unprocessable entity.",
    429: "Rate limit reached.",
    500: "The server had an error while processing your request.",
    502: "Bad gateway.",
    503: "The service is temporarily overloaded.",
    529: "Overloaded.",
}

_WORD = re.compile(r"\s*\S+")


def count_tokens(text: str) -> int:
    return len(text.split())


def pieces(text: str) -> list[str]:
    """Stream deltas: one word each, keeping the whitespace before it, so they join back."""
    return _WORD.findall(text) or ([text] if text else [])


_DECODER = json.JSONDecoder()


def _call_requests(text: str, tools: list[str]) -> list[Call]:
    """Every "call <tool> [JSON object]" in `text`, in order; unknown names are skipped.

    The JSON object is the longest valid prefix after the name (raw_decode), and scanning goes
    on after it, so a "call x" inside one call's arguments is not a call of its own."""
    if not tools:
        return []
    names = "|".join(re.escape(n) for n in sorted(set(tools), key=len, reverse=True))
    pattern = re.compile(rf"\bcall ({names})\b\s*")
    calls: list[Call] = []
    pos = 0
    while (m := pattern.search(text, pos)) is not None:
        pos = m.end()
        args: Any = {}
        if text.startswith("{", pos):
            try:
                args, pos = _DECODER.raw_decode(text, pos)
            except json.JSONDecodeError:
                args = {}
        calls.append(Call(m.group(1), args if isinstance(args, dict) else {}))
    return calls


def args_json(call: Call) -> str:
    """A call's arguments as the JSON text the wire formats send."""
    return msgspec.json.encode(call.args).decode()


def _fill(schema: dict[str, Any], echo: str) -> dict[str, Any]:
    out: dict[str, Any] = {"echo": echo}
    props = schema.get("properties") or {}
    defaults = {
        "string": echo,
        "integer": 0,
        "number": 0,
        "boolean": False,
        "array": [],
        "object": {},
        "null": None,
    }
    for name in schema.get("required") or []:
        typ = (props.get(name) or {}).get("type", "string")
        if isinstance(typ, list):
            typ = typ[0]
        out[name] = defaults.get(typ, echo)
    return out


def answer(
    turns: list[Turn],
    tools: list[str],
    max_tokens: int | None,
    json_mode: bool = False,
    json_schema: dict[str, Any] | None = None,
) -> Answer:
    """The deterministic model behind all three wire formats."""
    input_tokens = sum(count_tokens(t.text) for t in turns)
    last = next((t for t in reversed(turns) if t.role != "system"), None)
    last_text = last.text if last else ""
    if tools and last is not None and last.role == "user":
        calls = _call_requests(last_text, tools)
        if calls:
            # per call: its name plus the words of its JSON arguments
            output_tokens = sum(count_tokens(args_json(c)) + 1 for c in calls)
            return Answer(
                tool_calls=calls,
                finish="tool",
                input_tokens=input_tokens,
                output_tokens=output_tokens,
            )
    if json_mode:
        text = msgspec.json.encode(_fill(json_schema or {}, last_text)).decode()
        return Answer(text=text, input_tokens=input_tokens, output_tokens=count_tokens(text))
    words = f"echo: {last_text}".split()
    finish: Literal["stop", "length"] = "stop"
    if max_tokens is not None and len(words) > max_tokens:
        words, finish = words[:max_tokens], "length"
    return Answer(
        text=" ".join(words), finish=finish, input_tokens=input_tokens, output_tokens=len(words)
    )
