"""GenAI client spans (`chat {model}`) and tool spans (`execute_tool {name}`) for executors.

Attributes follow the OpenTelemetry GenAI conventions: gen_ai.operation.name, gen_ai.provider.name,
gen_ai.request.model / response.model, gen_ai.usage.input_tokens / output_tokens,
gen_ai.response.finish_reasons, error.type. Prompt and completion text (gen_ai.input.messages,
gen_ai.output.messages, tool arguments and results) are recorded only when the operator sets
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.

The wrappers duck-type the executor's Assignment and Result, so this module needs no workers code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Tracer

from . import chain_trace, messaging, tracing

# chainyard's provider kinds -> gen_ai.provider.name well-known values
PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini"}

Execute = Callable[[Any, Any], Awaitable[Any]]


def provider_name(kind: str) -> str:
    return PROVIDERS.get(kind, kind)


def _error_type(e: BaseException) -> str:
    status = getattr(e, "status", None)
    if status:
        return str(status)
    return getattr(e, "cls", None) or type(e).__qualname__


def _fail(span: Span, e: BaseException) -> None:
    tracing.record_error(span, e, _error_type(e))
    cls = getattr(e, "cls", None)
    if cls:
        span.set_attribute("chainyard.error.class", cls)


def _json(value: Any) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except Exception:
        return str(value)


def _input_messages(step: Any) -> str:
    msgs = [
        {"role": m.role, "parts": [{"type": "text", "content": m.content}]}
        for m in getattr(step, "messages", [])
    ]
    return _json(msgs)


def _output_messages(output: Any) -> str:
    parts: list[dict[str, Any]] = []
    if output.text:
        parts.append({"type": "text", "content": output.text})
    for c in output.tool_calls:
        parts.append({"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.args})
    return _json([{"role": "assistant", "parts": parts, "finish_reason": output.finish_reason}])


def _request(a: Any) -> dict[str, Any]:
    """The chat span's attributes, all given at its start (one call into the SDK). The chain,
    step and attempt are its `messaging.message.id` (`consumer_attributes`)."""
    t, step = a.target, a.step
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider_name(t.provider),
        "gen_ai.request.model": t.model,
        "chainyard.deployment": t.deployment,
    }
    params = getattr(step, "params", None)
    if params is not None:
        for field, name in (
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
        ):
            v = getattr(params, field, None)
            if v is not None:
                attrs[name] = v
    if tracing.capture_content:
        attrs["gen_ai.input.messages"] = _input_messages(step)
    return attrs


def _tracer() -> Tracer | None:
    """The tracer when this call gets a span of its own: tracing is on and the handler's trace
    is sampled in; else None (the call runs bare)."""
    tr = tracing.active
    if tr is None or messaging.sampled_out():
        return None
    return tr


def _start(tr: Tracer, name: str, kind: SpanKind, attrs: dict[str, Any]) -> Span:
    """The call's span, child of the handled message's context (the chain's span, or the call
    whose event the router routed from): it is also the message's `process` span, so it carries
    the consumer's attributes, and the routing decision that sent it here."""
    attrs.update(messaging.consumer_attributes())
    attrs.update(chain_trace.route_attributes(messaging.header(chain_trace.ROUTE_HEADER)))
    return tr.start_span(name, context=messaging.handler_context(), kind=kind, attributes=attrs)


def _produced(span: Span) -> None:
    """The step's event, sent next by the handler, is produced by this span."""
    if span.is_recording():
        messaging.make_current(trace.set_span_in_context(span))


def traced_chat(execute: Execute) -> Execute:
    """Wrap an LLM executor: one `chat {model}` CLIENT span per provider call, current while
    the call runs (an instrumented HTTP client's spans nest under it)."""

    async def run(a: Any, on_delta: Any) -> Any:
        tr = _tracer()
        if tr is None:
            return await execute(a, on_delta)
        t = a.target
        span = _start(tr, f"chat {t.model}", SpanKind.CLIENT, _request(a))
        recording = span.is_recording()
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            r = await execute(a, on_delta)
        except BaseException as e:
            _fail(span, e)
            raise
        else:
            if not recording:
                return r
            usage = r.usage
            done: dict[str, Any] = {
                "gen_ai.response.model": r.model or t.model,
                "gen_ai.usage.input_tokens": usage.input_tokens,
                "gen_ai.usage.output_tokens": usage.output_tokens,
                "gen_ai.response.finish_reasons": [r.output.finish_reason],
                "chainyard.cost_usd": float(r.cost_usd),
            }
            if r.ttft_ms is not None:
                done["chainyard.ttft_ms"] = float(r.ttft_ms)
            if tracing.capture_content:
                done["gen_ai.output.messages"] = _output_messages(r.output)
            span.set_attributes(done)
            return r
        finally:
            otel_context.detach(token)
            _produced(span)  # before `end`: an ended span no longer says it is recording
            span.end()

    return run


def traced_tool(name: str, execute: Execute) -> Execute:
    """Wrap a tool executor: one `execute_tool {name}` span, current while the tool runs."""

    async def run(a: Any, on_delta: Any = None) -> Any:
        tr = _tracer()
        if tr is None:
            return await execute(a, on_delta)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.type": "function",
        }
        call_id = getattr(a.step, "tool_call_id", None)
        if call_id:
            attrs["gen_ai.tool.call.id"] = call_id
        if tracing.capture_content:
            attrs["gen_ai.tool.call.arguments"] = _json(getattr(a.step, "args", None))
        span = _start(tr, f"execute_tool {name}", SpanKind.INTERNAL, attrs)
        token = otel_context.attach(trace.set_span_in_context(span))  # the tool's own spans
        try:
            r = await execute(a, on_delta)
        except BaseException as e:
            _fail(span, e)
            raise
        else:
            if tracing.capture_content:
                out = r.output
                span.set_attribute("gen_ai.tool.call.result", out.text or _json(out.data))
            return r
        finally:
            otel_context.detach(token)
            _produced(span)  # before `end`: an ended span no longer says it is recording
            span.end()

    return run
