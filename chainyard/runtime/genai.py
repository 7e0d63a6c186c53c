"""GenAI client spans (`chat {model}`) and tool spans (`execute_tool {name}`) around executors,
with the OpenTelemetry GenAI attributes (docs/TRACING.md); prompt and completion text only with
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true. Duck-typed: no workers code here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from . import chain_trace, messaging, tracing

# chainyard's provider kinds -> gen_ai.provider.name well-known values
PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}

Execute = Callable[[Any, Any], Awaitable[Any]]


def _fail(span: Span, e: BaseException) -> None:
    cls = getattr(e, "cls", None)
    tracing.record_error(span, e, str(getattr(e, "status", None) or cls or type(e).__qualname__))
    if cls:
        span.set_attribute("chainyard.error.class", cls)


def _json(value: Any) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except Exception:
        return str(value)


def _chat_request(a: Any) -> dict[str, Any]:
    """The chat span's attributes, all given at its start (one call into the SDK). The chain,
    step and attempt are its `messaging.message.id` (`consumer_attributes`)."""
    t, step = a.target, a.step
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDERS.get(t.provider, t.provider),
        "gen_ai.request.model": t.model,
        "chainyard.deployment": t.deployment,
    }
    params = getattr(step, "params", None)
    for key in ("max_tokens", "temperature"):
        if (v := getattr(params, key, None)) is not None:
            attrs[f"gen_ai.request.{key}"] = v
    if tracing.capture_content:
        msgs = getattr(step, "messages", [])
        attrs["gen_ai.input.messages"] = _json(
            [{"role": m.role, "parts": [{"type": "text", "content": m.content}]} for m in msgs]
        )
    return attrs


def _chat_result(span: Span, a: Any, r: Any) -> None:
    usage, output = r.usage, r.output
    done: dict[str, Any] = {
        "gen_ai.response.model": r.model or a.target.model,
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.response.finish_reasons": [output.finish_reason],
        "chainyard.cost_usd": float(r.cost_usd),
    }
    if r.ttft_ms is not None:
        done["chainyard.ttft_ms"] = float(r.ttft_ms)
    if tracing.capture_content:
        parts: list[dict[str, Any]] = (
            [{"type": "text", "content": output.text}] if output.text else []
        )
        for c in output.tool_calls:
            parts.append({"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.args})
        done["gen_ai.output.messages"] = _json(
            [{"role": "assistant", "parts": parts, "finish_reason": output.finish_reason}]
        )
    span.set_attributes(done)


def _traced(
    execute: Execute,
    kind: SpanKind,
    name: Callable[[Any], str],
    request: Callable[[Any], dict[str, Any]],
    result: Callable[[Span, Any, Any], None],
) -> Execute:
    """`execute` with a span of its own, current while it runs (an instrumented HTTP client's
    or the tool's own spans nest under it), unless tracing is off or the trace sampled out. The
    span is a child of the handled message's context (the chain's span, or the call whose
    event the router routed from): it is also the message's `process` span, so it carries the
    consumer's attributes, and the routing decision that sent it here."""

    async def run(a: Any, on_delta: Any = None) -> Any:
        tr = tracing.active
        if tr is None or messaging.sampled_out():
            return await execute(a, on_delta)
        attrs = request(a)
        attrs.update(messaging.consumer_attributes())
        attrs.update(chain_trace.route_attributes(messaging.header(chain_trace.ROUTE_HEADER)))
        span = tr.start_span(
            name(a), context=messaging.handler_context(), kind=kind, attributes=attrs
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            r = await execute(a, on_delta)
        except BaseException as e:
            _fail(span, e)
            raise
        else:
            if span.is_recording():
                result(span, a, r)
            return r
        finally:
            otel_context.detach(token)
            # the step's event, sent next by the handler, is produced by this span (asked
            # before `end`: an ended span no longer says it is recording)
            if span.is_recording():
                messaging.make_current(trace.set_span_in_context(span))
            span.end()

    return run


def traced_chat(execute: Execute) -> Execute:
    """Wrap an LLM executor: one `chat {model}` CLIENT span per provider call."""
    return _traced(
        execute, SpanKind.CLIENT, lambda a: f"chat {a.target.model}", _chat_request, _chat_result
    )


def traced_tool(name: str, execute: Execute) -> Execute:
    """Wrap a tool executor: one `execute_tool {name}` span."""

    def request(a: Any) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.type": "function",
        }
        if call_id := getattr(a.step, "tool_call_id", None):
            attrs["gen_ai.tool.call.id"] = call_id
        if tracing.capture_content:
            attrs["gen_ai.tool.call.arguments"] = _json(getattr(a.step, "args", None))
        return attrs

    def result(span: Span, a: Any, r: Any) -> None:
        if tracing.capture_content:
            span.set_attribute("gen_ai.tool.call.result", r.output.text or _json(r.output.data))

    return _traced(execute, SpanKind.INTERNAL, lambda a: f"execute_tool {name}", request, result)
