"""A local OTLP/HTTP receiver: aiohttp on a free port, protobuf decoded with opentelemetry-proto.

In tests: `async with OtlpReceiver() as r: ... r.endpoint ... r.spans`. As a process (for
benchmarks): `python tests/otlp_receiver.py` prints its endpoint and counts what it receives.
"""

from __future__ import annotations

import asyncio
import gzip
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


@dataclass
class Span:
    """One received span, ids as lowercase hex."""

    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attrs: dict[str, Any]
    links: list[tuple[str, str]]
    status_code: int

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def spans_of(req: ExportTraceServiceRequest) -> list[Span]:
    got: list[Span] = []
    for rs in req.resource_spans:
        res = {kv.key: value(kv.value) for kv in rs.resource.attributes}
        service = str(res.get("service.name", ""))
        for ss in rs.scope_spans:
            for s in ss.spans:
                got.append(
                    Span(
                        service=service,
                        name=s.name,
                        kind=s.kind,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attrs={kv.key: value(kv.value) for kv in s.attributes},
                        links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                        status_code=s.status.code,
                    )
                )
    return got


@dataclass
class OtlpReceiver:
    host: str = "127.0.0.1"
    port: int = 0
    spans: list[Span] = field(default_factory=list)
    metric_names: set[str] = field(default_factory=set)
    raw: list[ExportTraceServiceRequest] = field(default_factory=list)
    requests: int = 0
    discard: bool = False  # benchmarks: count the spans (GET /count), keep nothing
    spans_counted: int = 0
    bytes_received: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)  # of the last trace request
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> OtlpReceiver:
        self._changed = asyncio.Condition()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_get("/api/v3/traces/{trace_id}", self._jaeger)  # what Jaeger v2 answers
        app.router.add_get("/count", self._count)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        body = await request.read()
        enc = request.headers.get("Content-Encoding", "")
        if enc == "gzip" and body[:2] == b"\x1f\x8b":  # aiohttp may have inflated it already
            return gzip.decompress(body)
        if enc == "deflate":
            return zlib.decompress(body)
        return body

    async def _traces(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests += 1
        self.bytes_received += len(body)
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        if self.discard:
            self.spans_counted += sum(
                len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans
            )
            return web.Response(content_type="application/x-protobuf")
        await self.add(req)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def _count(self, request: web.Request) -> web.Response:
        return web.json_response({"spans": self.spans_counted, "requests": self.requests})

    async def add(self, req: ExportTraceServiceRequest) -> None:
        self.raw.append(req)
        assert self._changed is not None
        async with self._changed:
            self.spans.extend(spans_of(req))
            self._changed.notify_all()

    async def _jaeger(self, request: web.Request) -> web.Response:
        """Jaeger's `/api/v3/traces/{id}` shape: OTLP JSON under `result` (protobuf's JSON
        mapping, so ids are base64, as some servers send them)."""
        from google.protobuf.json_format import MessageToDict

        tid = bytes.fromhex(request.match_info["trace_id"])
        resource_spans = []
        for req in self.raw:
            for rs in req.resource_spans:
                keep = ExportTraceServiceRequest().resource_spans.add()
                keep.CopyFrom(rs)
                for ss in keep.scope_spans:
                    mine = [s for s in ss.spans if s.trace_id == tid]
                    del ss.spans[:]
                    ss.spans.extend(mine)
                resource_spans.append(MessageToDict(keep))
        return web.json_response({"result": {"resourceSpans": resource_spans}})

    async def _metrics(self, request: web.Request) -> web.Response:
        req = ExportMetricsServiceRequest()
        req.ParseFromString(await self._body(request))
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                self.metric_names.update(m.name for m in sm.metrics)
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> list[Span]:
        """Wait until `predicate(spans)` is true; return the spans."""
        assert self._changed is not None

        async def ok() -> list[Span]:
            async with self._changed:  # type: ignore[union-attr]
                await self._changed.wait_for(lambda: predicate(self.spans))  # type: ignore[union-attr]
                return list(self.spans)

        try:
            return await asyncio.wait_for(ok(), timeout)
        except TimeoutError:
            names = sorted({f"{s.service}:{s.name}" for s in self.spans})
            raise TimeoutError(f"spans never matched; have {len(self.spans)}: {names}") from None


class OtlpGrpcReceiver(OtlpReceiver):
    """The same receiver over OTLP/gRPC (traces only): grpc.aio on a free port."""

    _server: Any = None

    async def __aenter__(self) -> OtlpGrpcReceiver:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as svc

        receiver = self

        class Traces(svc.TraceServiceServicer):
            async def Export(  # the gRPC service method's name
                self, request: ExportTraceServiceRequest, context: Any
            ) -> ExportTraceServiceResponse:
                receiver.requests += 1
                await receiver.add(request)
                return ExportTraceServiceResponse()

        self._changed = asyncio.Condition()
        self._server = grpc.aio.server()
        svc.add_TraceServiceServicer_to_server(Traces(), self._server)
        self.port = self._server.add_insecure_port(f"{self.host}:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)


async def _serve() -> None:
    async with OtlpReceiver(discard="--discard" in sys.argv) as r:
        print(r.endpoint, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(_serve())
    except KeyboardInterrupt:
        sys.exit(0)
