"""A provider that answers at once, in process: for benchmarks of everything around the call."""

from __future__ import annotations

from chainyard.contracts import Output, Usage

from ._base import Completion, LlmRequest, OnDelta


class NullProvider:
    name = "null"

    async def complete(self, request: LlmRequest, on_delta: OnDelta | None = None) -> Completion:
        text = "ok"
        if on_delta is not None:
            on_delta(text)
        return Completion(
            output=Output(text=text, finish_reason="stop"),
            usage=Usage(
                input_tokens=sum(len(m.content.split()) for m in request.messages), output_tokens=1
            ),
            model=request.model,
        )

    async def aclose(self) -> None:
        return None
