"""The one interface every provider adapter implements, and the one error it raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from msgspec import Struct

from chainyard.contracts import (
    ChainyardError,
    ErrorClass,
    Message,
    Output,
    Params,
    ToolSpec,
    Usage,
)


class LlmRequest(Struct, frozen=True, kw_only=True):
    """A model call, normalised: the adapter turns it into its provider's wire format."""

    model: str  # the provider's own model name
    messages: list[Message]
    tools: list[ToolSpec] = []
    params: Params = Params()


class RateLimits(Struct, frozen=True, kw_only=True):
    """What the provider's rate-limit headers said, resets as absolute epoch milliseconds."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_at_ms: int | None = None
    reset_tokens_at_ms: int | None = None


class Completion(Struct, frozen=True, kw_only=True):
    output: Output
    usage: Usage
    model: str  # the model the provider says answered
    ttft_ms: float | None = None  # set when streamed
    limits: RateLimits | None = None


OnDelta = Callable[[str], None]


class ProviderError(ChainyardError):
    """Every failure of a provider call, classified once, here, for the router to act on."""

    def __init__(
        self,
        cls: ErrorClass,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        super().__init__(message)
        self.cls = cls
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        self.limits = limits

    def __repr__(self) -> str:
        # Built from the (already scrubbed) message only: never from request data or headers.
        return (
            f"ProviderError(cls={self.cls!r}, status={self.status!r}, "
            f"retry_after_s={self.retry_after_s!r}, message={self.message!r})"
        )


class Provider(Protocol):
    """One provider API. `complete` raises ProviderError and nothing else."""

    name: str  # "openai" | "anthropic" | "gemini" (the gen_ai.provider.name)

    async def complete(self, request: LlmRequest, on_delta: OnDelta | None = None) -> Completion:
        """Call the model; when `on_delta` is given, stream and pass each text delta to it."""
        ...

    async def aclose(self) -> None: ...
