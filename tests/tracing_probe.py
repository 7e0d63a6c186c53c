"""A process traced only by the `OTEL_*` variables it was started with (tests/test_tracing_env.py).

`python tests/tracing_probe.py NATS_URL roots N`: N messages published as new traces.
`python tests/tracing_probe.py NATS_URL hop TRACEPARENT`: a message carrying TRACEPARENT (and
baggage `tier=gold` if the propagators carry it) is handled by a traced consumer that runs a
traced tool call (`execute_tool probe`, the handler's span) and publishes onward; what the
handler saw and the onward message's headers are printed to stderr as JSON.
Spans go wherever `OTEL_TRACES_EXPORTER` says (console: stdout). With `PROBE_OWN_PROVIDER=1` the
probe first installs its own global TracerProvider (service `my-app`, console exporter), as an
application that sets up the SDK itself would.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from types import SimpleNamespace
from typing import Any

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from chainyard.runtime import genai, messaging, tracing
from chainyard.runtime.nats import connect


async def main(url: str, what: str, arg: str) -> None:
    if os.environ.get("PROBE_OWN_PROVIDER"):  # an application's own SDK setup, made first
        provider = TracerProvider(resource=Resource({"service.name": "my-app"}))
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
    on = tracing.setup("chainyard-probe")
    nc = await connect(url, name="probe")
    try:
        if what == "roots":
            for i in range(int(arg)):
                await messaging.publish(nc, "cy.work.probe", b"x", f"m{i}")
        else:
            await hop(nc, arg)
        await nc.flush()
    finally:
        await nc.close()
        if on:
            tracing.shutdown()
        if os.environ.get("PROBE_OWN_PROVIDER"):
            provider.shutdown()


async def hop(nc: Any, traceparent: str) -> None:
    seen: dict[str, Any] = {}
    onward: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def handler(msg: Any) -> None:
        seen["tier"] = baggage.get_baggage("tier")
        await tool(SimpleNamespace(step=None), None)  # a worker's call: its span, if any
        await messaging.publish(nc, "cy.events.t.c.step.completed", b"y", "e1")

    async def run_tool(a: Any, on_delta: Any) -> None:
        return None

    tool = genai.traced_tool("probe", run_tool)

    async def got_onward(msg: Any) -> None:
        if not onward.done():
            onward.set_result(dict(msg.headers or {}))

    await nc.subscribe("cy.work.hop", cb=messaging.consumer(handler, "probe"))
    await nc.subscribe("cy.events.t.c.step.completed", cb=got_onward)
    # the first hop's context: a remote parent and baggage, as a client would send them
    ctx = propagate.extract({"traceparent": traceparent})
    token = context.attach(baggage.set_baggage("tier", "gold", ctx))
    try:
        headers: dict[str, str] = {}
        propagate.inject(headers)
    finally:
        context.detach(token)
    await nc.publish("cy.work.hop", b"x", headers=headers)
    out = {"first": headers, "seen": seen, "onward": await asyncio.wait_for(onward, 10)}
    print(json.dumps(out), file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
