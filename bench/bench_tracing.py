"""What tracing costs per image request (a benchmark, not a test: it prints numbers).

- micro: the tracing calls one request makes (middleware check, parse, route attempt, image check)
  with tracing off, against a baseline of the same code path without them, in the same run; and with tracing on at sample_ratio 1.0 (spans made, batched and
  encoded to OTLP protobuf by the SDK's exporter encoder, not sent).
- requests: whole requests through the proxy in this process (placeholder route, 64x64 b64_json),
  tracing off and on (ratio 1.0, the same encoding exporter), interleaved rounds: CPU time per request.

Times are the process's CPU time (time.process_time), so other processes on a shared machine do not count.

Usage: python bench/bench_tracing.py [--requests 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from timeit import timeit as wall_timeit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from proxy import build_app, parse_config  # noqa: E402
from proxy.app import GATEWAY  # noqa: E402
from proxy.telemetry import tracing  # noqa: E402
from proxy.telemetry.otel import OtelTracing  # noqa: E402
from proxy.telemetry.settings import TraceSettings  # noqa: E402

# CPU time of the whole process (the exporter's thread included), not wall time: on a shared machine
# wall time counts the other processes' turns too.
timeit = partial(wall_timeit, timer=time.process_time)


class EncodingExporter:
    """Encodes each batch as the OTLP exporter would (protobuf), then drops it: the CPU of export, no I/O."""

    def export(self, spans):
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExportResult

        encode_spans(spans).SerializeToString()
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


def baseline_path(gw_tracing) -> None:
    """One request's code path where tracing hooks in, without the hooks."""
    return None


def traced_path(gw_tracing) -> None:
    """The same path with the tracing calls a b64_json request makes (proxy/app.py, proxy/api/generations.py,
    proxy/routing/router.py, proxy/media/output.py), in order."""
    if gw_tracing is not None:  # the middleware
        raise AssertionError("off only")
    with tracing.span("parse"):
        pass
    if tracing.current() is not None:  # generations.traced
        pass
    traced = tracing.current() is not None  # router: the route attempt
    with tracing.span("route_attempt", {} if traced else None):
        pass
    with tracing.span("image.check", {"qip.bytes": 1000}):
        if tracing.current() is not None:
            pass


def on_path(otel) -> None:
    """The same spans with tracing on (a request span and its children)."""
    with otel.request("POST", "/v1/images/generations", {}):
        with tracing.span("parse"):
            pass
        with tracing.span("route_attempt", {"qip.route": "p", "qip.provider": "placeholder", "qip.attempt": 1}), \
                tracing.span("image.check", {"qip.bytes": 1000}):
            pass
        tracing.annotate_request({"qip.model": "m", "qip.outcome": "ok", "http.response.status_code": 200})
        tracing.trace_id()


def micro(number: int) -> None:
    # Every span is kept until encoded (the SDK drops spans past a queue of 2048 by default).
    os.environ.setdefault("OTEL_BSP_MAX_QUEUE_SIZE", str(number))
    base = min(timeit(lambda: baseline_path(None), number=number) for _ in range(5)) / number
    off = min(timeit(lambda: traced_path(None), number=number) for _ in range(5)) / number
    call = min(timeit(lambda: None, number=number) for _ in range(5)) / number
    print(f"micro, per request: baseline {base * 1e6:.2f} us, tracing off {off * 1e6:.2f} us "
          f"(+{(off - base) * 1e6:.2f} us); for scale, one empty Python call here takes {call * 1e9:.0f} ns")
    otel = OtelTracing(TraceSettings("http://127.0.0.1:9/v1/traces", "http/protobuf", 1.0, "bench", {}, False),
                       exporter=EncodingExporter())
    n = max(1, number // 20)
    runs = []
    for _ in range(3):  # the spans made, then every one of them encoded (flushed): all of it is CPU time
        started = time.process_time()
        for _ in range(n):
            on_path(otel)
        otel.provider.force_flush()
        runs.append((time.process_time() - started) / n)
    otel.shutdown()
    print(f"micro, per request: tracing on at ratio 1.0 {min(runs) * 1e6:.1f} us (4 spans, made and encoded, not sent)")


async def requests(count: int, rounds: int) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    folder = tempfile.mkdtemp()
    cfg = {"store": {"path": folder}, "providers": {"p": {"kind": "placeholder"}},
           "size_tables": {"t": {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64"}}}},
           "models": {"m": {"sizes": "t", "routes": ["p"]}}}
    body = {"model": "m", "prompt": "a fox", "size": "64x64", "response_format": "b64_json"}
    clients = {}
    for mode in ("off", "on"):
        app = build_app(parse_config(cfg, env={}))
        if mode == "on":
            app[GATEWAY].tracing = OtelTracing(TraceSettings("http://127.0.0.1:9/v1/traces", "http/protobuf", 1.0,
                                                             "bench", {}, False), exporter=EncodingExporter())
        clients[mode] = TestClient(TestServer(app))
        await clients[mode].start_server()
    results: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode, client in clients.items():
            for _ in range(20):  # warm
                await (await client.post("/v1/images/generations", json=body)).read()
            started = time.process_time()
            for _ in range(count):
                r = await client.post("/v1/images/generations", json=body)
                await r.read()
            results[mode].append((time.process_time() - started) / count)
    for client in clients.values():
        await client.close()
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(f"requests (placeholder, 64x64 b64_json, c=1, {rounds}x{count}; client and proxy in this process): "
          f"CPU per request, median of rounds: tracing off {off * 1e6:.0f} us, on at ratio 1.0 {on * 1e6:.0f} us "
          f"(+{(on - off) * 1e6:.0f} us)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--number", type=int, default=200000)
    args = parser.parse_args()
    micro(args.number)
    asyncio.run(requests(args.requests, args.rounds))


if __name__ == "__main__":
    main()
