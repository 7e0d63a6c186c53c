"""Google Gemini API `generateContent` / `streamGenerateContent?alt=sse`.

`base_url` is the host, e.g. "https://generativelanguage.googleapis.com" (a trailing "/v1beta" or
"/v1" is accepted and then used as the API version). The key goes in `x-goog-api-key`, never in
the query string, so it cannot leak through a logged URL.
"""

from __future__ import annotations

import time
from typing import Any

from chainyard.contracts import Message, Output, ToolCall, Usage
from chainyard.contracts._messages import FinishReason

from ._base import Completion, LlmRequest, OnDelta
from ._errors import boundary, iter_sse, post_json
from ._http import HttpClient, HttpSettings
from .openai import json_data

_FINISH: dict[str, FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def convert_messages(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """(system instruction, contents). Gemini names function responses, not call ids, so a tool
    message's name is looked up from the assistant call it answers."""
    system: list[str] = []
    names: dict[str, str] = {}
    contents: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            system.append(m.content)
            continue
        parts: list[dict[str, Any]] = []
        if m.role == "tool":
            role = "user"
            data = json_data(m.content) if m.content else None
            name = names.get(m.tool_call_id or "", m.tool_call_id or "tool")
            parts.append(
                {
                    "functionResponse": {
                        "name": name,
                        # `response` must be an object; wrap anything else.
                        "response": data if isinstance(data, dict) else {"result": m.content},
                    }
                }
            )
        else:
            role = "model" if m.role == "assistant" else "user"
            if m.content:
                parts.append({"text": m.content})
            for c in m.tool_calls:
                names[c.id] = c.name
                parts.append({"functionCall": {"name": c.name, "args": c.args}})
            if not parts:
                parts.append({"text": ""})
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return "\n\n".join(s for s in system if s), contents


class GeminiProvider:
    def __init__(
        self,
        base_url: str = "https://generativelanguage.googleapis.com",
        api_key: str | None = None,
        *,
        timeout_s: float = 600.0,
        http: HttpSettings | None = None,
        api_version: str = "v1beta",
        name: str = "gemini",
        headers: dict[str, str] | None = None,
    ) -> None:
        hdrs = {"content-type": "application/json", **(headers or {})}
        if api_key:
            hdrs["x-goog-api-key"] = api_key
        self.name = name
        self._secrets = (api_key,) if api_key else ()
        tail = base_url.rstrip("/").rsplit("/", 1)[-1]
        versioned = tail in ("v1", "v1beta", "v1alpha")
        self._prefix = "/models" if versioned else f"/{api_version}/models"
        self._client = HttpClient(base_url, hdrs, timeout_s, http)

    def __repr__(self) -> str:
        return f"GeminiProvider(base_url={self._client.base_url!r})"

    def body(self, request: LlmRequest) -> dict[str, Any]:
        p = request.params
        system, contents = convert_messages(request.messages)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        if request.tools:
            body["tools"] = [
                {
                    "functionDeclarations": [
                        {"name": t.name, "description": t.description, "parameters": t.parameters}
                        for t in request.tools
                    ]
                }
            ]
            if p.tool_choice and p.tool_choice != "auto":
                mode = {"none": "NONE", "required": "ANY"}.get(p.tool_choice, "ANY")
                calling: dict[str, Any] = {"mode": mode}
                if mode == "ANY" and p.tool_choice != "required":
                    calling["allowedFunctionNames"] = [p.tool_choice]
                body["toolConfig"] = {"functionCallingConfig": calling}
        gen: dict[str, Any] = {}
        if p.max_tokens is not None:
            gen["maxOutputTokens"] = p.max_tokens
        if p.temperature is not None:
            gen["temperature"] = p.temperature
        if p.stop:
            gen["stopSequences"] = list(p.stop)
        if p.response_format == "json":
            gen["responseMimeType"] = "application/json"
            if p.json_schema is not None:
                gen["responseJsonSchema"] = p.json_schema
        if gen:
            body["generationConfig"] = gen
        return body

    async def complete(self, request: LlmRequest, on_delta: OnDelta | None = None) -> Completion:
        if on_delta is not None:
            return await self._stream(request, on_delta)
        path = f"{self._prefix}/{request.model}:generateContent"
        data, _ = await post_json(self._client, self.name, path, self.body(request), self._secrets)
        with boundary(self.name, self._secrets):
            acc = _Acc()
            acc.add(data, None, 0.0)
            return acc.completion(request, None)

    async def _stream(self, request: LlmRequest, on_delta: OnDelta) -> Completion:
        started = time.perf_counter()
        path = f"{self._prefix}/{request.model}:streamGenerateContent?alt=sse"
        acc = _Acc()
        chunks = iter_sse(self._client, self.name, path, self.body(request), self._secrets)
        with boundary(self.name, self._secrets):
            async for chunk in chunks:
                acc.add(chunk, on_delta, started)
            return acc.completion(request, acc.ttft)

    async def aclose(self) -> None:
        await self._client.aclose()


class _Acc:
    """Folds one response or a stream of chunks (same shape) into a Completion."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.calls: list[ToolCall] = []
        self.finish: str | None = None
        self.usage = Usage()
        self.model: str | None = None
        self.ttft: float | None = None

    def add(self, chunk: dict[str, Any], on_delta: OnDelta | None, started: float) -> None:
        if "error" in chunk:  # an error inside a 200 stream
            raise ValueError(f"stream error: {chunk['error']}")
        self.model = chunk.get("modelVersion") or self.model
        meta = chunk.get("usageMetadata")
        if meta:  # cumulative in every chunk; the last one is the total
            self.usage = Usage(
                input_tokens=int(meta.get("promptTokenCount") or 0),
                output_tokens=int(meta.get("candidatesTokenCount") or 0)
                + int(meta.get("thoughtsTokenCount") or 0),
            )
        for cand in (chunk.get("candidates") or [])[:1]:
            self.finish = cand.get("finishReason") or self.finish
            for part in (cand.get("content") or {}).get("parts") or []:
                if part.get("thought"):
                    continue  # thinking summaries are not the answer
                text = part.get("text")
                call = part.get("functionCall")
                if (text or call) and self.ttft is None and on_delta is not None:
                    self.ttft = (time.perf_counter() - started) * 1000
                if text:
                    self.parts.append(text)
                    if on_delta is not None:
                        on_delta(text)
                if call:
                    args = call.get("args")
                    self.calls.append(
                        ToolCall(
                            id=call.get("id") or f"call_{len(self.calls)}",
                            name=call["name"],
                            args=args if isinstance(args, dict) else {},
                        )
                    )

    def completion(self, request: LlmRequest, ttft: float | None) -> Completion:
        text = "".join(self.parts)
        reason = _FINISH.get(self.finish or "", "other")
        if self.calls and reason == "stop":  # Gemini says STOP after function calls
            reason = "tool_calls"
        data = json_data(text) if request.params.response_format == "json" and text else None
        return Completion(
            output=Output(text=text, data=data, tool_calls=self.calls, finish_reason=reason),
            usage=self.usage,
            model=self.model or request.model,
            ttft_ms=ttft,
            limits=None,
        )
