"""Tracing is the OpenTelemetry SDK, set up from the standard `OTEL_*` variables: docs/TRACING.md
("Configuration", "How spans are made") says which and how, DESIGN-NOTES #23 why. Off, nothing
is installed and the helpers in `messaging`, `genai` and `chain_trace` return after one check
of `tracing.active`. An application's own global TracerProvider is used as is.
"""

from __future__ import annotations

import contextvars
import logging
import os
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
)

from chainyard.contracts import ConfigError

log = logging.getLogger("chainyard.tracing")

TRUE = ("1", "true", "yes", "on")

active: Tracer | None = None  # the tracer the helpers use; None: tracing is off
_owned: TracerProvider | None = None  # a provider this module built (flushed and shut down here)
_installed: set[int] = set()  # ids of providers this module made global (never "the app's own")
# OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: prompt and completion text in spans
capture_content = False
# True when the provider's sampler drops the children of a sampled-out remote parent (asked once,
# in `enable`, through its public `should_sample`): the helpers then make no span at all under
# such a parent and forward the message's trace headers unchanged (DESIGN-NOTES #28)
drops_unsampled = False
# the provider's sampler (the SDK's public `TracerProvider.sampler`), asked once per chain at
# intake; None for a provider without one (the chain then follows its parent, or is sampled)
sampler: Sampler | None = None
# a chain's own span is emitted when the chain ends, with the ids drawn at intake (chain_trace)
forced_ids: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "chainyard_forced_ids", default=None
)


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


class ChainIds(IdGenerator):
    """Random ids, except while a chain's span is being started: its ids were drawn at intake."""

    def __init__(self, inner: IdGenerator | None = None) -> None:
        self.inner = inner or RandomIdGenerator()

    def generate_span_id(self) -> int:
        forced = forced_ids.get()
        return forced[1] if forced is not None else self.inner.generate_span_id()

    def generate_trace_id(self) -> int:
        forced = forced_ids.get()
        return forced[0] if forced is not None else self.inner.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return self.inner.is_trace_id_random()


def configured() -> bool:
    """What the standard variables say: an exporter or an OTLP endpoint, SDK not disabled."""
    if _env("OTEL_SDK_DISABLED").lower() in TRUE:
        return False
    names = _env("OTEL_TRACES_EXPORTER").lower()
    return names != "none" if names else otlp_endpoint()


def otlp_endpoint() -> bool:
    return bool(_env("OTEL_EXPORTER_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def resource(default_service: str) -> Resource:
    """The SDK's resource from the environment; `default_service` when it names no service."""
    r = Resource.create()
    if str(r.attributes.get("service.name", "")).startswith("unknown_service"):
        r = r.merge(Resource({"service.name": default_service}))
    return r


def exporters() -> list[Any]:
    """The span exporters `OTEL_TRACES_EXPORTER` names (default `otlp`), from entry points."""
    names = [n.strip().lower() for n in (_env("OTEL_TRACES_EXPORTER") or "otlp").split(",")]
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL")
    # the specification's default for `otlp` is http/protobuf (the Python SDK's own is gRPC)
    otlp = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    out = []
    for name in names:
        if not name or name == "none":
            continue
        ep = otlp if name == "otlp" else name
        found = entry_points(group="opentelemetry_traces_exporter", name=ep)
        if not found:
            hint = " (pip install 'chainyard[grpc]')" if ep == "otlp_proto_grpc" else ""
            raise ConfigError(f"OTEL_TRACES_EXPORTER={name}: no span exporter {ep!r}{hint}")
        out.append(next(iter(found)).load()())
    return out


def _apps_provider() -> Any:
    """The global TracerProvider if the application installed one (not the API's proxy)."""
    p = trace.get_tracer_provider()
    if isinstance(p, trace.ProxyTracerProvider | trace.NoOpTracerProvider) or id(p) in _installed:
        return None
    return p


def build_provider(default_service: str) -> TracerProvider:
    """The SDK's TracerProvider as the variables configure it, one BatchSpanProcessor (its
    `OTEL_BSP_*`) per exporter: what `setup` installs, and what the benchmark measures."""
    provider = TracerProvider(resource=resource(default_service), id_generator=ChainIds())
    for exporter in exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup(default_service: str) -> bool:
    """Trace this process as the `OTEL_*` variables say. An application's own global provider
    wins over the variables. True when this call turned tracing on (then `shutdown` undoes it),
    False when it was off or already on."""
    global _owned
    if active is not None:
        return False
    if use_global():
        log.info("tracing with the application's TracerProvider")
        return True
    if not configured():
        return False
    provider = build_provider(default_service)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)  # for other libraries' spans too (once a process)
        _installed.add(id(provider))
    _owned = provider
    enable(provider)
    log.info("tracing as %s", provider.resource.attributes.get("service.name"))
    return True


def enable(provider: Any, *, capture: bool | None = None) -> None:
    """Trace with `provider` (an SDK TracerProvider, or any OTel API provider)."""
    global active, capture_content, drops_unsampled, sampler
    t = provider.get_tracer("chainyard")
    found = getattr(provider, "sampler", None)  # the SDK TracerProvider's public property
    sampler = found if isinstance(found, Sampler) else None
    drops_unsampled = sampler is not None and _drops_unsampled_children(sampler)
    gen = getattr(t, "id_generator", None)  # the SDK Tracer's public attribute
    if isinstance(gen, IdGenerator) and not isinstance(gen, ChainIds):
        t.id_generator = ChainIds(gen)  # type: ignore[attr-defined]  # chain spans keep their ids
    if capture is None:
        capture = _env("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT").lower() in TRUE
    capture_content = capture
    active = t


def _drops_unsampled_children(s: Sampler) -> bool:
    """Ask the sampler once: would it drop a span whose remote parent was sampled out?"""
    ids = RandomIdGenerator()
    trace_id = ids.generate_trace_id()
    parent = SpanContext(trace_id, ids.generate_span_id(), True, TraceFlags(TraceFlags.DEFAULT))
    ctx = trace.set_span_in_context(NonRecordingSpan(parent))
    try:
        result = s.should_sample(ctx, trace_id, "chainyard.probe", SpanKind.CONSUMER)
    except Exception:  # an application's sampler that cannot answer: ask it for every span
        return False
    return result.decision == Decision.DROP


def disable() -> None:
    global active
    active = None


def use_global() -> bool:
    """Trace with the application's own provider, if it installed one (the client does)."""
    if active is not None:
        return True
    app = _apps_provider()
    if app is None:
        return False
    enable(app)
    return True


def shutdown() -> None:
    """Flush and shut down what `setup` built (an application's provider is the app's)."""
    global _owned
    disable()
    if _owned is not None:
        try:
            _owned.force_flush(5000)
            _owned.shutdown()
        except Exception as e:  # exporting must never fail a service's exit
            log.warning("tracing shutdown: %s", e)
        _owned = None


def record_error(span: Span, e: BaseException, error_type: str | None = None) -> None:
    span.set_attribute("error.type", error_type or type(e).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(e)[:200]))
