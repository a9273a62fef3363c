"""An OTLP/HTTP trace receiver on loopback: decodes each ExportTraceServiceRequest with opentelemetry-proto
and keeps the spans, so tests check the trees the proxy exports as a collector would see them."""

from __future__ import annotations

import asyncio
import gzip
import time
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    status: int  # 0 unset, 1 ok, 2 error
    service: str
    attributes: dict = field(default_factory=dict)
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id) of each linked span


class OtlpReceiver:
    def __init__(self):
        self.spans: list[Span] = []
        self.headers: list[dict] = []
        self.url = ""
        self.grpc_server = None

    async def start(self, aiohttp_server) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        server = await aiohttp_server(app)
        self.url = str(server.make_url("")).rstrip("/")
        return self

    def start_grpc(self) -> str:
        """The same receiver over OTLP/gRPC (a grpc server on a free loopback port): its address."""
        from concurrent.futures import ThreadPoolExecutor

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (the generated service's name)
                receiver.headers.append(dict(context.invocation_metadata()))
                receiver.keep(request)
                return ExportTraceServiceResponse()

        self.grpc_server = grpc.server(ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.grpc_server)
        port = self.grpc_server.add_insecure_port("127.0.0.1:0")
        self.grpc_server.start()
        return f"http://127.0.0.1:{port}"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.headers.append(dict(request.headers))
        self.keep(ExportTraceServiceRequest.FromString(body))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def keep(self, message: ExportTraceServiceRequest) -> None:
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(Span(
                        name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(), kind=s.kind, start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano, status=s.status.code, service=resource.get("service.name", ""),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links]))

    async def trace_with(self, name: str, timeout: float = 60.0, **attributes) -> list[Span]:
        """Every span of the first trace holding a span `name` with these attributes, once it arrived."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for s in self.spans:
                if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items()):
                    await asyncio.sleep(0.3)  # its siblings come in the same or the next batch
                    return [t for t in self.spans if t.trace_id == s.trace_id]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no span {name} {attributes} arrived; got {[s.name for s in self.spans]}")


def children(spans: list[Span], parent: Span, name: str | None = None) -> list[Span]:
    """The direct children of `parent` (named `name`), in start order."""
    found = [s for s in spans if s.parent_id == parent.span_id and (name is None or s.name == name)]
    return sorted(found, key=lambda s: s.start_ns)


def one(spans: list[Span], name: str) -> Span:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]
