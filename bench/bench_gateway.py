"""What the gateway adds next to its upstream: real processes on loopback, one table (a benchmark, not a test).

    python bench/bench_gateway.py            # ~3-4 minutes: 3 interleaved rounds, medians
    python bench/bench_gateway.py --quick    # ~1 minute: the same table from fewer requests
    python bench/bench_gateway.py --uvloop   # adds a column: the same proxy on uvloop's event loop
    python bench/bench_gateway.py --profile  # then py-spy on the proxy during the c=16 / c=8 runs
    python bench/bench_gateway.py --micro    # then the hot path's steps one by one, in this process
    python bench/bench_gateway.py --memory   # then idle memory after the large run: malloc_trim, glibc knobs
    python bench/bench_gateway.py --variant all=pybase64+splice-json   # a column per patched proxy (PATCHES)
    python bench/bench_gateway.py --no-table --micro                   # only the in-process step costs
    python bench/bench_gateway.py --burst    # thousands in flight against a slow mock (bench/burst.py)

Processes (all on 127.0.0.1, each its own; with 2 cores they all share the CPU, the numbers say so):

- the mock upstream (bench/mock_upstream.py): answers POST /v1/images/generations at once with a fixed
  pre-encoded noise PNG, 64x64 ("small") or 1024x1024 ("large", ~3.1 MB, ~4.2 MB as base64);
- the proxy, `python -m proxy serve --config <tmp config>` (one `openai` provider pointing at the mock,
  retries 0, max_images_per_call 1, output_formats [png] so every other format is converted here);
- the load generator (this file, --worker loadgen): one aiohttp client with a fixed concurrency, the
  same for every target, driven by the orchestrator (this file) over stdin/stdout;
- the orchestrator itself probes the target's GET /health every 10 ms during each run (the event
  loop's worst stall) and reads the proxy's resident memory from /proc/<pid>/status.

Each round runs every case against every target back to back (direct to the mock, then the proxy; the
order alternates per round); the table shows the median over the rounds. See bench/README.md for what
each row means.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
MODEL = "qwen-image"
MODEL_URL_UPSTREAM = "qwen-image-urlup"  # a second route whose upstream answers with URLs
SMALL, LARGE = "64x64", "1024x1024"
PROBE_INTERVAL = 0.010


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    key: str
    body: dict
    concurrency: int
    count: int  # the most requests of one run
    seconds: float  # the most time one run may take (the in-flight requests then finish)
    follow_url: bool = False  # url answers: the client also GETs each image (the time counts)
    direct: bool = True  # also run straight against the mock (the same body)
    proxy_only_reference: str | None = None  # else: compare with this case's direct run
    min_bytes: int = 0


def _body(size: str = LARGE, **more) -> dict:
    """The request; the mock answers noise, or a photo-like image for a prompt that starts with "photo"."""
    return {"model": MODEL, "prompt": "a benchmark", "size": size, "response_format": "b64_json", **more}


PHOTO = "photo, a benchmark"


def cases(quick: bool) -> list[Case]:
    s = 0.4 if quick else 1.5  # fewer requests for --quick

    def n(count: int) -> int:
        return max(4, int(count * s))

    def t(seconds: float) -> float:
        return max(1.0, seconds * (0.5 if quick else 1.2))

    big = 4_000_000
    return [
        Case("small_c1", _body(SMALL), 1, n(400), t(4), min_bytes=1000),
        Case("large_c1", _body(LARGE), 1, n(60), t(5), min_bytes=big),
        Case("small_c16", _body(SMALL), 16, n(1200), t(4), min_bytes=1000),
        Case("large_c8", _body(LARGE), 8, n(120), t(6), min_bytes=big),
        Case("url_c1", _body(LARGE, response_format="url"), 1, n(40), t(4), follow_url=True),
        Case("url_c8", _body(LARGE, response_format="url"), 8, n(120), t(6), follow_url=True),
        Case("upurl_c1", _body(LARGE, model=MODEL_URL_UPSTREAM), 1, n(40), t(4), direct=False,
             proxy_only_reference="large_c1", min_bytes=big),
        Case("n4_small_c1", _body(SMALL, n=4), 1, n(200), t(3), min_bytes=4000),
        Case("n4_large_c1", _body(LARGE, n=4), 1, n(20), t(4), min_bytes=4 * big),
        # Conversions of the photo-like image (noise is the encoders' worst case: the row after shows it).
        Case("jpeg_c1", _body(LARGE, output_format="jpeg", prompt=PHOTO), 1, n(20), t(3), direct=False,
             proxy_only_reference="large_c1", min_bytes=1000),
        Case("jpeg_c4", _body(LARGE, output_format="jpeg", prompt=PHOTO), 4, n(60), t(3), direct=False,
             proxy_only_reference="large_c1", min_bytes=1000),
        Case("webp_c1", _body(LARGE, output_format="webp", prompt=PHOTO), 1, n(12), t(3), direct=False,
             proxy_only_reference="large_c1", min_bytes=1000),
        Case("webp_c4", _body(LARGE, output_format="webp", prompt=PHOTO), 4, n(40), t(4), direct=False,
             proxy_only_reference="large_c1", min_bytes=1000),
        Case("webp_noise_c1", _body(LARGE, output_format="webp"), 1, n(4), t(2), direct=False,
             proxy_only_reference="large_c1", min_bytes=1000),
        Case("avif_c1", _body(LARGE, output_format="avif", prompt=PHOTO), 1, n(4), t(3), direct=False,
             proxy_only_reference="large_c1", min_bytes=1000),
        Case("avif_c4", _body(LARGE, output_format="avif", prompt=PHOTO), 4, 4 if quick else 8, t(3), direct=False,
             proxy_only_reference="large_c1", min_bytes=1000),
    ]


# ------------------------------------------------------------------------------------ small helpers


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def family(pid: int) -> list[int]:
    """The process and its children, recursively (`serve --workers N`: the parent and its N workers)."""
    found = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    found += family(int(child))
    return found


def proc_status_kb(pid: int, field_name: str) -> int | None:
    """A /proc/<pid>/status field (kB), summed over the process's family (its workers)."""
    total = None
    for member in family(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                for line in f:
                    if line.startswith(field_name + ":"):
                        total = (total or 0) + int(line.split()[1])
        except OSError:
            continue
    return total


def rss_mb(pid: int) -> float:
    kb = proc_status_kb(pid, "VmRSS")
    return kb / 1024 if kb is not None else math.nan


def reset_peak(pid: int) -> bool:
    """Reset VmHWM (the peak RSS) to the current RSS: Linux's clear_refs 5."""
    try:
        for member in family(pid):
            with open(f"/proc/{member}/clear_refs", "w") as f:
                f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time the process (and its workers) used so far, all threads; see cpu_seconds_one."""
    return sum(cpu_seconds_one(member) for member in family(pid))


def cpu_seconds_one(pid: int) -> float:
    """CPU time the process has used so far, all its threads (schedstat: ns; else stat: clock ticks)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        if total:
            return total / 1e9
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return math.nan


def peak_mb(pid: int) -> float:
    """VmHWM; for several workers the sum of each one's peak (an upper bound of their peak together)."""
    kb = proc_status_kb(pid, "VmHWM")
    return kb / 1024 if kb is not None else math.nan


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = "?"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "?"
    return (f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
            f"aiohttp {aiohttp.__version__}, commit {commit}")


def loadavg() -> str:
    """The system's 1, 5 and 15 minute load averages: other work on the machine skews every number."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# ------------------------------------------------------------------------------- the load generator


async def _one_request(http: aiohttp.ClientSession, url: str, payload: bytes, case: dict) -> int:
    """One request (and, for url answers, the GET of each image); returns the bytes received."""
    async with http.post(url, data=payload, headers={"Content-Type": "application/json"}) as resp:
        data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
    received = len(data)
    if case["follow_url"]:
        for item in json.loads(data)["data"]:
            image_url = item["url"]
            if URL(image_url).host != LOOPBACK:
                raise RuntimeError(f"refusing a non-loopback image URL {image_url}")
            async with http.get(image_url) as resp:
                image = await resp.read()
                if resp.status != 200 or not image.startswith(b"\x89PNG"):
                    raise RuntimeError(f"GET image: HTTP {resp.status}")
                received += len(image)
    elif received < case["min_bytes"] or b'"b64_json"' not in data[:300]:
        raise RuntimeError(f"short answer ({received} bytes): {data[:200]!r}")
    return received


async def load_run(http: aiohttp.ClientSession, spec: dict) -> dict:
    """spec: url, body, concurrency, count, seconds, follow_url, min_bytes -> latencies and wall time."""
    payload = json.dumps(spec["body"]).encode()
    latencies: list[float] = []
    errors: list[str] = []
    remaining = spec["count"]
    received = 0
    deadline = time.perf_counter() + spec["seconds"]

    async def worker() -> None:
        nonlocal remaining, received
        while remaining > 0 and time.perf_counter() < deadline and len(errors) < 20:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                received += await _one_request(http, spec["url"], payload, spec)
            except Exception as e:  # counted and reported, never hidden
                errors.append(f"{type(e).__name__}: {e}"[:300])
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    wall = time.perf_counter() - t0
    return {"lat_ms": latencies, "wall": wall, "errors": len(errors), "first_error": errors[0] if errors else None,
            "bytes": received}


async def loadgen_worker() -> None:
    """--worker loadgen: one JSON spec per stdin line, one JSON result per stdout line, until EOF."""
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as http:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            spec = json.loads(line)
            result = await load_run(http, spec)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()


class LoadGen:
    """The load generator process, driven line by line."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--worker", "loadgen",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024, cwd=ROOT)

    async def run(self, spec: dict) -> dict:
        self.proc.stdin.write((json.dumps(spec) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=spec["seconds"] + 180)
        if not line:
            raise RuntimeError("the load generator exited")
        return json.loads(line)

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


# --------------------------------------------------------------------------------- the processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def _wait_for_line(proc: subprocess.Popen, path: Path, pattern: str, seconds: float, name: str) -> re.Match:
    deadline = time.monotonic() + seconds
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = regex.search(text)
        if found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not start within {seconds:.0f} s:\n{path.read_text(errors='replace')[-3000:]}")


def start_mock(tmp: Path) -> Proc:
    log = tmp / "mock.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen([sys.executable, str(HERE / "mock_upstream.py"), "--port", "0"], cwd=ROOT,
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    found = _wait_for_line(popen, log, r"listening on (http://127\.0\.0\.1:\d+)", 60, "the mock upstream")
    return Proc("mock", popen, found.group(1), log)


def write_config(tmp: Path, mock_url: str, name: str) -> Path:
    """The proxy's config (JSON is YAML): the mock as an openai provider, twice (b64 and url answers)."""
    provider = {"kind": "openai", "base_url": f"{mock_url}/v1", "api_key": "bench", "max_images_per_call": 1,
                "output_formats": ["png"], "timeout": 120}
    config = {
        "server": {"host": LOOPBACK, "port": 0, "max_body_mb": 64, "request_timeout": 300, "log_level": "info"},
        "store": {"path": str(tmp / f"images-{name}"), "ttl_seconds": 900},
        # The ledger in this run's folder: the default (var/ under the working directory) would grow by
        # every run's records, and a bigger file measures its own writes, not the gateway.
        "usage": {"path": str(tmp / f"usage-{name}.sqlite3")},
        "routing": {"retries": 0},
        "providers": {"mock": provider, "mock-url": {**provider, "response_format": "url"}},
        "size_tables": {"bench": {"default": LARGE, "tiers": {"1K": {"1:1": LARGE}}}},
        "models": {MODEL: {"sizes": "bench", "routes": ["mock"]},
                   MODEL_URL_UPSTREAM: {"sizes": "bench", "routes": ["mock-url"]}},
    }
    path = tmp / f"config-{name}.yaml"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_proxy(tmp: Path, mock_url: str, name: str, *, patches: tuple[str, ...] = (), wrapper: bool = False,
                env: dict | None = None, workers: int = 1) -> Proc:
    """`python -m proxy serve` (`--workers N` for several processes on one port); or, with patches (or
    wrapper), this file's --worker proxy: the same CLI in a process that first applies the named patches
    (PATCHES) and takes SIGUSR1 as malloc_trim(0)."""
    config = write_config(tmp, mock_url, name)
    log = tmp / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
    if name in FORWARDERS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "floor", "--config", str(config)]
        if name == "cut-through":
            cmd.append("--cut-through")
    elif patches or wrapper:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "proxy", "--config", str(config),
               "--patches", ",".join(patches)]
    else:
        cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
    with open(log, "wb") as out:
        popen = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})})
    found = _wait_for_line(popen, log, r"serving on http://(127\.0\.0\.1:\d+)", 120, f"the proxy ({name})")
    return Proc(name, popen, f"http://{found.group(1)}", log)


# Changes to try without editing the proxy: applied in the --worker proxy process before it serves, each
# a stand-in for a change proposed in bench/README.md. Measure them as extra columns with --variant.


def _patch_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _patch_pybase64() -> None:
    """proxy.media.output's base64 calls (strict decode of the upstream's text, encode for b64_json) via pybase64."""
    import pybase64

    import proxy.media.output

    class Base64:
        b64decode = staticmethod(pybase64.b64decode)
        b64encode = staticmethod(pybase64.b64encode)

    proxy.media.output.base64 = Base64


def spliced_loads(raw: bytes):
    """The proxy's own answer parser (openai_compat.parse_answer: the b64_json strings cut out first)."""
    from proxy.providers.openai_compat import parse_answer

    return parse_answer(raw)


def _patch_splice_json() -> None:
    """openai_compat parses the upstream body with the b64_json strings cut out (spliced_loads)."""
    from proxy.providers import openai_compat

    def json_or_none(raw: bytes):
        try:
            return spliced_loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None

    openai_compat._json_or_none = json_or_none


def _patch_orjson() -> None:
    import orjson

    from proxy.providers import openai_compat

    def json_or_none(raw: bytes):
        try:
            return orjson.loads(raw)
        except ValueError:
            return None

    openai_compat._json_or_none = json_or_none


def _patch_quiet_access_log() -> None:
    """No aiohttp access log line (the proxy.requests line stays): one log record less per request."""
    import logging

    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _patch_single_await() -> None:
    """gather_or_cancel awaits a single awaitable directly: no task and no gather for n=1."""
    import proxy.media.output

    gather = proxy.media.output.gather_or_cancel

    async def gather_or_cancel(aws):
        if len(aws) == 1:
            return [await aws[0]]
        return await gather(aws)

    proxy.media.output.gather_or_cancel = gather_or_cancel


def _patch_fast_encoders() -> None:
    """WebP with method 2 (Pillow's default is 4) and AVIF with speed 8 (Pillow's default is 6), as the
    defaults of every Image.save in this process (what proxy.media.output.encode_image would pass)."""
    from PIL import Image

    save = Image.Image.save

    def patched(self, fp, format=None, **params):  # noqa: A002 (Pillow's own name)
        kind = (format or "").upper()
        if kind == "WEBP":
            params.setdefault("method", 2)
        elif kind == "AVIF":
            params.setdefault("speed", 8)
        return save(self, fp, format, **params)

    Image.Image.save = patched


def _patch_loop_lag() -> None:
    """A probe inside the proxy: a 2 ms sleep, again and again; each time it wakes late, how late, and how
    much CPU the event loop's thread used meanwhile (busy running callbacks) and how long it waited for a
    CPU (the kernel's schedstat); the rest of the delay is waiting for the GIL. Printed every 2 s to the
    proxy's log (grep loop-lag)."""
    import threading

    import proxy.http.server

    make = proxy.http.server.new_event_loop

    async def monitor() -> None:
        worst: list[tuple[float, float]] = []
        last_print = time.monotonic()
        stat = f"/proc/self/task/{threading.get_native_id()}/schedstat"

        def waited() -> float:  # seconds this thread was runnable but not running (the kernel's count)
            with open(stat) as f:
                return int(f.read().split()[1]) / 1e9

        while True:
            t0, c0, w0 = time.perf_counter(), time.thread_time(), waited()
            await asyncio.sleep(0.002)
            late = time.perf_counter() - t0 - 0.002
            worst.append((late * 1000, (time.thread_time() - c0) * 1000, (waited() - w0) * 1000))
            if time.monotonic() - last_print > 2:
                worst.sort(reverse=True)
                print("loop-lag worst (late ms, loop CPU ms, waiting for a CPU ms; the rest: for the GIL):",
                      " ".join(f"{a:.1f}/{b:.1f}/{c:.1f}" for a, b, c in worst[:5]), "| gc", report_gc(), flush=True)
                worst, last_print = [], time.monotonic()

    import gc

    collections: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections[info["generation"]].append((time.perf_counter() - started[0]) * 1000)

    gc.callbacks.append(on_gc)

    def report_gc() -> str:
        text = " ".join(f"gen{g}: {len(v)}x, worst {max(v, default=0):.1f} ms" for g, v in collections.items())
        for v in collections.values():
            v.clear()
        return text

    def new_event_loop():
        loop = make()
        loop.call_soon(lambda: loop.create_task(monitor()))
        return loop

    proxy.http.server.new_event_loop = new_event_loop


def _patch_inline_check() -> None:
    """The structural check of an upstream's image (strict base64 decode, header and CRCs) on the event
    loop up to 8 MB of base64 (~1 ms of work) instead of in a thread past 64 KB."""
    import proxy.media.output
    from proxy.http.cpu import run_cpu

    async def run_cpu_8mb(size, fn, *args):
        return fn(*args) if size <= 8 << 20 else await run_cpu(size, fn, *args)

    proxy.media.output.run_cpu = run_cpu_8mb


def _patch_gc_freeze() -> None:
    """gc.freeze() once the app is built: the objects of start-up (modules, config) leave the collector's walks."""
    import gc

    import proxy.http.server

    make = proxy.http.server.new_event_loop

    def new_event_loop():
        gc.collect()
        gc.freeze()
        return make()

    proxy.http.server.new_event_loop = new_event_loop


def _patch_gc_off() -> None:
    """No automatic garbage collection at all (a yardstick for what the collector costs; not a fix)."""
    import gc

    gc.disable()


def _patch_gc_threshold() -> None:
    """A young generation of 20,000 objects instead of 700: fewer collections, each over more objects."""
    import gc

    gc.set_threshold(20_000, 10, 10)


def _patch_gc_threshold_50k() -> None:
    import gc

    gc.set_threshold(50_000, 10, 10)


def _patch_gc_threshold_5k() -> None:
    import gc

    gc.set_threshold(5_000, 10, 10)


def _patch_gc_stats() -> None:
    """The garbage collector's work, printed to the proxy's log every 5 s while it collects (grep gc-stats):
    collections per generation, their total and worst time, and the objects each generation held."""
    import gc
    import threading

    totals = {g: [0, 0.0, 0.0, 0] for g in range(3)}  # count, total ms, worst ms, objects collected
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - started[0]) * 1000
        t = totals[info["generation"]]
        t[0] += 1
        t[1] += ms
        t[2] = max(t[2], ms)
        t[3] += info["collected"]

    def report() -> None:
        while True:
            time.sleep(5)
            if any(t[0] for t in totals.values()):
                print("gc-stats: " + "; ".join(f"gen{g} {t[0]}x {t[1]:.0f} ms (worst {t[2]:.1f}, collected {t[3]})"
                                               for g, t in totals.items()) + f"; tracked now {len(gc.get_objects())}, "
                      f"frozen {gc.get_freeze_count()}", flush=True)
                for t in totals.values():
                    t[:] = [0, 0.0, 0.0, 0]

    gc.callbacks.append(on_gc)
    threading.Thread(target=report, daemon=True).start()


def _patch_no_ledger() -> None:
    """The usage ledger records nothing (a yardstick for what writing it costs; not a fix)."""
    from proxy.usage.ledger import LedgerWriter

    LedgerWriter.add = lambda self, record: None


PATCHES = {"no-ledger": _patch_no_ledger, "gc-stats": _patch_gc_stats, "gc-freeze": _patch_gc_freeze, "gc-off": _patch_gc_off, "gc-threshold": _patch_gc_threshold,
           "gc-threshold-50k": _patch_gc_threshold_50k, "gc-threshold-5k": _patch_gc_threshold_5k,
           "inline-check": _patch_inline_check, "loop-lag": _patch_loop_lag, "uvloop": _patch_uvloop, "fast-encoders": _patch_fast_encoders, "pybase64": _patch_pybase64, "splice-json": _patch_splice_json,
           "orjson": _patch_orjson, "quiet-access-log": _patch_quiet_access_log, "single-await": _patch_single_await}


def proxy_worker(config: str, patches: list[str]) -> None:
    """--worker proxy: the proxy's own CLI in this process, after the named patches; SIGUSR1 = malloc_trim(0)."""
    import ctypes

    sys.path.insert(0, str(ROOT))
    extra = os.environ.get("QIP_BENCH_EXTRA")  # a folder with pybase64 / orjson: pip install --target DIR ...
    if extra:
        sys.path.append(extra)
    for name in patches:
        PATCHES[name]()

    def trim(_signum, _frame) -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    signal.signal(signal.SIGUSR1, trim)
    from proxy.cli import main as proxy_main

    proxy_main(["serve", "--config", config])


# The b64 cases a bare forwarder can stand in for (it converts nothing, stores nothing, makes no n calls).
FLOOR_CASES = ("small_c1", "large_c1", "small_c16", "large_c8")


# The bare forwarders: "floor" reads the answer whole, then sends it; "cut-through" sends each piece of
# it as it arrives (what a gateway could do that neither checks nor changes the images).
FORWARDERS = ("floor", "cut-through")


def floor_worker(config: str, cut_through: bool = False) -> None:
    """--worker floor: the least an aiohttp gateway does, as a yardstick: the same aiohttp and uvloop, one
    ClientSession, the client's body forwarded to the mock and its answer handed back as it is; no
    parsing, checks, routing, logging or metrics. With cut_through, the answer is streamed through."""
    import uvloop
    from aiohttp import web

    upstream = json.loads(Path(config).read_text())["providers"]["mock"]["base_url"] + "/images/generations"

    async def generations(request: web.Request) -> web.Response:
        async with request.app[HTTP].post(upstream, data=await request.read(),
                                          headers={"Content-Type": "application/json"}) as resp:
            if not cut_through:
                return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")
            response = web.StreamResponse(status=resp.status, headers={"Content-Type": "application/json"})
            response.content_length = resp.content_length
            await response.prepare(request)
            async for piece in resp.content.iter_any():
                await response.write(piece)
            await response.write_eof()
            return response

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def session(app: web.Application):
        # No cap on connections (aiohttp's default is 100): a burst of slow answers would queue behind it.
        app[HTTP] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[HTTP].close()

    HTTP = web.AppKey("http", aiohttp.ClientSession)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/health", health)
    app.cleanup_ctx.append(session)
    # The accept queue `serve` listens with (proxy.http.server.LISTEN_BACKLOG): bursts compare the work per
    # request, not how many connections the kernel drops and the clients retry.
    sock = socket.create_server((LOOPBACK, 0), backlog=4096)
    print(f"serving on http://{LOOPBACK}:{sock.getsockname()[1]}", flush=True)
    web.run_app(app, sock=sock, access_log=None, print=None, loop=uvloop.new_event_loop(), backlog=4096)


# ------------------------------------------------------------------------------ probe and one run


async def probe(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> list[float]:
    """GET url every PROBE_INTERVAL until stop; the latency of each (ms). Late probes never burst."""
    latencies: list[float] = []
    next_at = time.perf_counter()
    while not stop.is_set() and len(latencies) < 100_000:
        t0 = time.perf_counter()
        try:
            async with http.get(url) as resp:
                await resp.read()
        except aiohttp.ClientError:
            pass
        latencies.append((time.perf_counter() - t0) * 1000)
        next_at += PROBE_INTERVAL
        delay = next_at - time.perf_counter()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        else:
            next_at = time.perf_counter()
    return latencies


@dataclass
class RunResult:
    p50: float
    p99: float
    rps: float
    stall: float  # the worst /health latency during the run (ms)
    probe_p50: float
    rss_peak: float  # MB; nan for the mock
    cpu: float  # ms of CPU the target process (mock or proxy) used per answered request
    ok: int
    errors: int
    first_error: str | None = None


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    loadgen: LoadGen
    probe_http: aiohttp.ClientSession
    targets: dict[str, Proc] = field(default_factory=dict)  # "direct" -> mock, "proxy" -> proxy, ...
    probe_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds one /health costs each target

    async def measure_probe_cost(self, target: str, seconds: float = 1.5) -> None:
        """The CPU one /health probe costs the target when idle: taken off each run's CPU per request."""
        proc = self.targets[target]
        stop = asyncio.Event()
        before = cpu_seconds(proc.pid)
        prober = asyncio.ensure_future(probe(self.probe_http, f"{proc.base_url}/health", stop))
        await asyncio.sleep(seconds)
        stop.set()
        probes = await prober
        self.probe_cpu[target] = max(0.0, (cpu_seconds(proc.pid) - before) / max(1, len(probes)))

    async def run(self, case: Case, target: str, *, count: int | None = None, seconds: float | None = None,
                  with_probe: bool = True) -> RunResult:
        proc = self.targets[target]
        spec = {"url": f"{proc.base_url}/v1/images/generations", "body": case.body,
                "concurrency": case.concurrency, "count": count or case.count,
                "seconds": seconds or case.seconds, "follow_url": case.follow_url, "min_bytes": case.min_bytes}
        is_proxy = target != "direct"
        if is_proxy:
            reset_peak(proc.pid)
        stop = asyncio.Event()
        prober = asyncio.ensure_future(probe(self.probe_http, f"{proc.base_url}/health", stop)) \
            if with_probe else None
        cpu_before = cpu_seconds(proc.pid)
        try:
            out = await self.loadgen.run(spec)
        finally:
            cpu_used = cpu_seconds(proc.pid) - cpu_before
            stop.set()
            probes = await prober if prober else []
        lat = out["lat_ms"]
        return RunResult(
            p50=percentile(lat, 0.5), p99=percentile(lat, 0.99),
            rps=len(lat) / out["wall"] if out["wall"] > 0 else math.nan,
            stall=max(probes) if probes else math.nan, probe_p50=percentile(probes, 0.5),
            rss_peak=peak_mb(proc.pid) if is_proxy else math.nan,
            cpu=(cpu_used - len(probes) * self.probe_cpu.get(target, 0.0)) * 1000 / len(lat) if lat else math.nan,
            ok=len(lat), errors=out["errors"], first_error=out["first_error"])


# ------------------------------------------------------------------------------------- sanity checks


async def sanity(http: aiohttp.ClientSession, proxy_url: str) -> None:
    """Each path answers what it should (format, size) before anything is timed."""
    from PIL import Image

    checks = [({"output_format": "jpeg", "prompt": PHOTO}, "JPEG"), ({"output_format": "webp", "prompt": PHOTO}, "WEBP"),
              ({"output_format": "avif", "prompt": PHOTO}, "AVIF"), ({}, "PNG"), ({"model": MODEL_URL_UPSTREAM}, "PNG")]
    for extra, fmt in checks:
        async with http.post(f"{proxy_url}/v1/images/generations", json=_body(LARGE, **extra)) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"sanity {extra}: HTTP {resp.status} {data}")
        im = Image.open(io.BytesIO(base64.b64decode(data["data"][0]["b64_json"])))
        if im.format != fmt or im.size != (1024, 1024):
            raise RuntimeError(f"sanity {extra}: got {im.format} {im.size}, expected {fmt} 1024x1024")
    async with http.post(f"{proxy_url}/v1/images/generations", json=_body(SMALL, n=4)) as resp:
        data = await resp.json()
        if resp.status != 200 or len(data["data"]) != 4:
            raise RuntimeError(f"sanity n=4: HTTP {resp.status}, {len(data.get('data', []))} images")
    async with http.post(f"{proxy_url}/v1/images/generations", json=_body(LARGE, response_format="url")) as resp:
        data = await resp.json()
    async with http.get(data["data"][0]["url"]) as resp:
        if resp.status != 200 or not (await resp.read()).startswith(b"\x89PNG"):
            raise RuntimeError("sanity url: the stored image does not come back")


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Row:
    label: str
    case: str
    metric: str  # p50 | p99 | rps | stall | rss
    compare: str  # "added" (proxy - direct, ms) | "ratio" (proxy / direct) | "" (none)
    target: str = ""
    check: object = None  # value compared (added, ratio or the proxy's own value) -> bool


ROWS = [
    Row("added p50, c=1, 64x64 b64", "small_c1", "p50", "added", "<= +0.4 ms", lambda v: v <= 0.4),
    Row("added p99, c=1, 64x64 b64", "small_c1", "p99", "added"),
    Row("CPU per request, c=1, 64x64 b64 (mock / proxy)", "small_c1", "cpu", ""),
    Row("added p50, c=1, 1024x1024 b64", "large_c1", "p50", "added", "<= +2 ms", lambda v: v <= 2.0),
    Row("added p99, c=1, 1024x1024 b64", "large_c1", "p99", "added"),
    Row("CPU per request, c=1, 1024x1024 b64 (mock / proxy)", "large_c1", "cpu", ""),
    Row("requests/s, c=16, 64x64 b64", "small_c16", "rps", "ratio", ">= 25 % of direct", lambda v: v >= 0.25),
    Row("requests/s, c=8, 1024x1024 b64", "large_c8", "rps", "ratio", ">= 90 % of direct", lambda v: v >= 0.90),
    Row("CPU per request, c=16, 64x64 b64 (mock / proxy)", "small_c16", "cpu", ""),
    Row("CPU per request, c=8, 1024x1024 b64 (mock / proxy)", "large_c8", "cpu", ""),
    Row("p50 under load, c=8, 1024x1024 b64", "large_c8", "p50", "added"),
    Row("url: p50, c=1, 1024 (answer + GET)", "url_c1", "p50", "added"),
    Row("url: requests/s, c=8, 1024", "url_c8", "rps", "ratio"),
    Row("url: worst /health, c=8, 1024 (ms)", "url_c8", "stall", "", "<= 10 ms (no stall)", lambda v: v <= 10),
    Row("url: CPU per request, c=8, 1024 (mock / proxy)", "url_c8", "cpu", ""),
    Row("upstream url -> b64: p50, c=1, 1024", "upurl_c1", "p50", "added"),
    Row("n=4 as 4 calls: p50, c=1, 64x64", "n4_small_c1", "p50", "added"),
    Row("n=4 as 4 calls: p50, c=1, 1024", "n4_large_c1", "p50", "added"),
    Row("photo png -> jpeg: p50, c=1, 1024", "jpeg_c1", "p50", "added"),
    Row("photo png -> jpeg: images/s, c=4, 1024", "jpeg_c4", "rps", ""),
    Row("photo png -> webp: p50, c=1, 1024", "webp_c1", "p50", "added"),
    Row("photo png -> webp: images/s, c=4, 1024", "webp_c4", "rps", "", ">= 20 images/s", lambda v: v >= 20),
    Row("noise png -> webp: p50, c=1, 1024", "webp_noise_c1", "p50", "added"),
    Row("photo png -> avif: p50, c=1, 1024", "avif_c1", "p50", "added"),
    Row("photo png -> avif: images/s, c=4, 1024", "avif_c4", "rps", ""),
]


def _fmt(metric: str, v: float) -> str:
    if math.isnan(v):
        return "-"
    if metric in ("p50", "p99", "stall", "cpu"):
        return f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms"
    if metric == "rps":
        return f"{v:.0f}/s" if v >= 100 else f"{v:.1f}/s"
    if metric == "rss":
        return f"{v:.0f} MB"
    return f"{v:.2f}"


def _cmp(compare: str, v: float) -> str:
    if math.isnan(v):
        return "-"
    if compare == "added":
        return f"{v:+.2f} ms" if abs(v) < 100 else f"{v:+.0f} ms"
    if compare == "ratio":
        return f"{v * 100:.0f} %"
    return ""


def build_table(results: dict, case_by_key: dict[str, Case], proxies: list[str], memory: dict) -> tuple[str, int]:
    """The one table (markdown), and how many targets were missed."""
    extra_cols = [f"{p}" for p in proxies[1:]]
    head = ["measurement", "direct", "proxy", *extra_cols, "proxy vs direct", "target", "met",
            "worst /health ms (direct / proxy)", "proxy RSS peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    missed = 0

    def series(case: str, target: str, metric: str) -> list[float]:
        return [getattr(r, metric) for r in results.get(case, {}).get(target, [])]

    def ref_direct(case_key: str) -> str:
        case = case_by_key[case_key]
        return case.proxy_only_reference if not case.direct else case_key

    for row in ROWS:
        if row.case not in results:
            continue
        ref = ref_direct(row.case)
        metric = "stall" if row.metric == "stall" else row.metric
        direct_vals = series(ref, "direct", metric)
        direct = median(direct_vals)
        cells = [row.label + (" (direct: b64 1024, c=1)" if ref != row.case and row.compare else "")]
        cells.append(_fmt(metric, direct) if row.compare or metric == "cpu" else "-")
        compared = {}
        for p in proxies:
            vals = series(row.case, p, metric)
            value = median(vals)
            if row.compare == "added":
                pairs = [a - b for a, b in zip(vals, direct_vals, strict=False)]
                compared[p] = median(pairs)
            elif row.compare == "ratio":
                pairs = [a / b for a, b in zip(vals, direct_vals, strict=False) if b]
                compared[p] = median(pairs)
            else:
                compared[p] = value
            text = _fmt(metric, value)
            if p != proxies[0] and row.compare:
                text += f" ({_cmp(row.compare, compared[p])})"
            cells.append(text)
        main = compared[proxies[0]]
        cells.append(_cmp(row.compare, main) if row.compare else "")
        cells.append(row.target or "")
        if row.check is not None and not math.isnan(main):
            ok = row.check(main)
            missed += not ok
            cells.append("yes" if ok else "**no**")
        else:
            cells.append("")
        d_stall = median(series(row.case, "direct", "stall")) if case_by_key[row.case].direct else math.nan
        p_stall = median(series(row.case, proxies[0], "stall"))
        cells.append(f"{_fmt('stall', d_stall).replace(' ms', '')} / {_fmt('stall', p_stall).replace(' ms', '')}")
        cells.append(_fmt("rss", median(series(row.case, proxies[0], "rss_peak"))))
        lines.append("| " + " | ".join(cells) + " |")

    # Memory rows: idle (at start and after the runs) and the peak during the large c=8 run.
    idle_start, idle_after = memory["idle_start"], memory["idle_after"]
    ok_idle = idle_after <= 60 and idle_start <= 60
    missed += not ok_idle
    n_extra = len(extra_cols)
    lines.append("| " + " | ".join([
        "proxy RSS idle: at start / after the runs", "-", f"{idle_start:.0f} / {idle_after:.0f} MB",
        *[f"{memory['idle_start_' + p]:.0f} / {memory['idle_after_' + p]:.0f} MB" for p in proxies[1:]],
        "", "<= 60 MB", "yes" if ok_idle else "**no**", "", ""]) + " |")
    peak = median(series("large_c8", proxies[0], "rss_peak"))
    ok_peak = peak <= 150
    missed += not ok_peak
    lines.append("| " + " | ".join([
        "proxy RSS peak during c=8 1024 b64", "-", _fmt("rss", peak),
        *[_fmt("rss", median(series("large_c8", p, "rss_peak"))) for p in proxies[1:]],
        "", "<= 150 MB", "yes" if ok_peak else "**no**", "", ""]) + " |")
    all_peaks = [r.rss_peak for case in results.values() for r in case.get(proxies[0], [])]
    lines.append("| " + " | ".join([
        "proxy RSS peak over every run", "-", _fmt("rss", max(all_peaks) if all_peaks else math.nan),
        *["" for _ in range(n_extra)], "", "", "", "", ""]) + " |")
    return "\n".join(lines), missed


# ------------------------------------------------------------------------------------------- profile


# Where a sample goes: the innermost frame that matches decides (checked from the leaf up).
CATEGORIES = [
    ("base64 decode (output._strict_b64 / decode_b64)", ("b64decode (base64.py", "_strict_b64 (proxy/media/output.py",
                                                         "decode_b64 (proxy/media/output.py")),
    ("base64 encode (output._b64)", ("b64encode (base64.py", "_b64 (proxy/media/output.py")),
    ("JSON parse of the upstream body (openai_compat._json_or_none)", ("_json_or_none (proxy/", "json_or_none (",
                                                                       "spliced_loads (")),
    ("Pillow decode / encode (output.convert)", ("convert (proxy/media/output.py", "encode_image (proxy/media/output.py")),
    ("structural image check (imagecheck.check_image)", ("check_image (proxy/media/imagecheck/",)),
    ("response JSON (generations.body_parts, SentAsIs)", ("body_parts (proxy/", "dumps_with_b64 (proxy/",
                                                           "SentAsIs.write (proxy/")),
    ("logging (access log + proxy.requests)", ("(logging/__init__.py", "(aiohttp/web_log.py")),
    ("Prometheus metrics", ("(prometheus_client/",)),
    ("image store write", ("FilesystemStore.", "(proxy/state/store_folder.py")),
    ("JSON, other", ("(json/",)),
    ("socket send (loopback TCP work in the syscall)", ("_SelectorSocketTransport.write ", "_write_ready",
                                                        "_SelectorSocketTransport.writelines",
                                                        "StreamWriter._writelines", "StreamWriter._write ")),
    ("socket receive + HTTP parsing", ("_read_ready", "data_received", "StreamReader.")),
    ("thread hand-offs (to_thread, call_soon_threadsafe)", ("ThreadPoolExecutor.submit", "_write_to_self",
                                                            "call_soon_threadsafe", "to_thread (")),
]
# The rest by the innermost frame's module.
GENERIC = [("aiohttp request handling, other", ("(aiohttp/", "(multidict/", "(yarl/")),
           ("the proxy's own code, other", ("(proxy/",)),
           ("asyncio machinery, other", ("(asyncio/", "(selectors.py", "(threading.py", "(concurrent/"))]


def categorize(frames: list[str]) -> str:
    """The first category (in CATEGORIES' order) that any frame of the stack matches; waiting by the leaf."""
    leaf = frames[-1]
    if leaf.startswith(("EpollSelector.select", "_worker (concurrent/futures/thread.py")):
        return "waiting (epoll, idle pool threads)"
    if leaf.startswith(("run (proxy/http/server.py", "BaseEventLoop.run_until_complete")):
        return "inside the event loop's C code (uvloop: socket I/O, epoll, callbacks)"
    for name, needles in CATEGORIES:
        if any(n in frame for frame in frames for n in needles):
            return name
    for frame in reversed(frames):
        for name, needles in GENERIC:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarize_collapsed(path: Path, top: int = 14) -> str:
    """py-spy's raw (collapsed) stacks -> where the samples went: by category, self time, and the loop thread."""
    total = 0
    loop_count = 0
    by_cat: dict[str, int] = {}
    self_time: dict[str, int] = {}
    loop_self: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        on_loop = "MainThread" in stack.split(";", 1)[0]  # with --threads the stack starts with its thread
        frames = [f for f in stack.split(";") if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        total += count
        cat = categorize(frames)
        by_cat[cat] = by_cat.get(cat, 0) + count
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + count
        if on_loop:
            loop_count += count
            loop_self[frames[-1]] = loop_self.get(frames[-1], 0) + count
    if not total:
        return "  (no samples)"

    def short(frame: str) -> str:
        return frame.replace(str(ROOT) + "/", "")

    out = [f"  {total} samples, {loop_count * 100 / total:.0f} % of them on the event loop thread"]
    out.append("  by category (innermost match):")
    for name, c in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        out.append(f"    {c * 100 / total:5.1f} %  {name}")
    out.append("  self time, top frames (a C call counts in the Python line that made it):")
    for frame, c in sorted(self_time.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"    {c * 100 / total:5.1f} %  {short(frame)}")
    return "\n".join(out)


async def profile_runs(bench: Bench, case_by_key: dict[str, Case], seconds: float) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("\nprofile: py-spy is not installed (pip install py-spy); skipped")
        return
    target = bench.args.profile_target
    proxy = bench.targets[target]
    out_dir = bench.tmp
    for key in bench.args.profile_cases.split(","):
        case = case_by_key.get(key)
        if case is None:
            continue
        raw = out_dir / f"profile-{key}.txt"
        svg = out_dir / f"profile-{key}.svg"
        gil = out_dir / f"profile-{key}-gil.txt"
        print(f"\nprofile: py-spy on {target} during {key} ({case.concurrency} concurrent, {seconds:.0f} s a recording)")
        for fmt, path, more in (("raw", raw, []), ("raw", gil, ["--gil"]), ("flamegraph", svg, [])):
            spy_proc = await asyncio.create_subprocess_exec(
                spy, "record", "--pid", str(proxy.pid), "--rate", "250", "--duration", str(int(seconds)),
                "--nonblocking", "--threads", *more, "--format", fmt, "-o", str(path),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            await asyncio.sleep(0.3)
            result = await bench.run(case, target, count=10**6, seconds=seconds + 0.5, with_probe=False)
            _, err = await asyncio.wait_for(spy_proc.communicate(), seconds + 30)
            if spy_proc.returncode != 0 or not path.exists():
                print(f"  py-spy failed ({spy_proc.returncode}): {err.decode(errors='replace')[-500:]}")
                break
            if path == raw:
                print(f"  all threads ({result.rps:.0f} requests/s while profiled; py-spy 250 Hz, --nonblocking):")
                print(summarize_collapsed(raw))
            elif path == gil:
                print("  only the thread holding the GIL (--gil): what keeps the event loop from running:")
                print(summarize_collapsed(gil))
        print(f"  stacks: {raw}, {gil}\n  flame graph: {svg}")


# ---------------------------------------------------------------------------------------- micro costs


def micro(quick: bool) -> None:
    """The hot path's steps one by one at 1024x1024, in this process; and how long each holds the GIL."""
    import zlib

    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from proxy.api.generations import body_parts
    from proxy.media.imagecheck import check_image

    sys.path.insert(0, str(HERE))
    from mock_upstream import MockUpstream

    mock = MockUpstream()
    png = mock.png[f"{LARGE}-noise"]
    b64 = mock.b64[f"{LARGE}-noise"]
    body = mock.answer(f"{LARGE}-noise", 1, "b64_json", "http://127.0.0.1:1")
    extra_path = os.environ.get("QIP_BENCH_EXTRA")  # a folder with pybase64 / orjson (pip install --target)
    if extra_path:
        sys.path.insert(0, extra_path)
    optional = {}
    for name in ("pybase64", "orjson", "simdjson"):
        with contextlib.suppress(ImportError):
            optional[name] = __import__(name)
    reps = 5 if quick else 15

    def timed(fn, *args) -> float:
        fn(*args)
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*args)
            samples.append((time.perf_counter() - t0) * 1000)
        return statistics.median(samples)

    def blocked(fn, *args) -> float:
        """How long the event loop is held up while fn runs in a thread (asyncio.to_thread): the longest
        gap of a 0.5 ms ticker during each call, median over 5 calls (a C call that keeps the GIL shows
        its whole duration; scheduling noise shows less in the median)."""

        async def ticker(gaps: list[float], done: asyncio.Event) -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                await asyncio.sleep(0.0005)
                gaps.append(time.perf_counter() - t0 - 0.0005)

        async def go() -> float:
            worst: list[float] = []
            for _ in range(5):
                gaps, done = [0.0], asyncio.Event()
                tick = asyncio.ensure_future(ticker(gaps, done))
                await asyncio.sleep(0.005)
                await asyncio.to_thread(fn, *args)
                done.set()
                await tick
                worst.append(max(gaps) * 1000)
            return statistics.median(worst)

        return asyncio.run(go())

    payload = json.loads(body)
    steps = [
        ("json.loads of the upstream body (4.2 MB)", json.loads, body),
        ("base64.b64decode(validate=True), 4.2 MB", lambda t: base64.b64decode(t, validate=True), b64),
        ("check_image (PNG: chunks + CRC-32), 3.1 MB", check_image, png),
        ("  of which zlib.crc32 over the whole file", zlib.crc32, png),
        ("base64.b64encode, 3.1 MB (url->b64, conversions)", base64.b64encode, png),
        ("body_parts (the response JSON, in pieces)", lambda p: body_parts({"data": [dict(p["data"][0])], "x": 1}),
         payload),
        ("bytes.decode('ascii') of 4.2 MB (a copy)", lambda b: b.decode("ascii"), body),
        ("PNG decode 1024x1024 (Pillow load)", lambda d: Image.open(io.BytesIO(d)).load(), png),
    ]
    steps.insert(1, ("  spliced_loads (b64_json cut out, the rest parsed)", spliced_loads, body))
    if "orjson" in optional:
        steps.insert(1, ("  orjson.loads of the same body", optional["orjson"].loads, body))
    if "pybase64" in optional:
        pb = optional["pybase64"]
        steps.insert(3, ("  pybase64.b64decode(validate=True)", lambda t: pb.b64decode(t, validate=True), b64))
        steps.insert(7, ("  pybase64.b64encode", pb.b64encode, png))
    print("\nmicro: the steps of a 1024x1024 b64 passthrough, median of", reps, "(ms); and the longest event loop "
          "gap while each runs in asyncio.to_thread (the GIL it holds)")
    print(f"  {'step':52s} {'time':>9s} {'loop gap':>10s}")
    for label, fn, arg in steps:
        print(f"  {label:52s} {timed(fn, arg):8.2f}  {blocked(fn, arg):9.2f}")
    if "pybase64" not in optional or "orjson" not in optional:
        print("  (pybase64 / orjson rows: pip install --target DIR pybase64 orjson; QIP_BENCH_EXTRA=DIR)")

    # Encoder settings at 1024x1024: the noise image (the encoders' worst case) and the photo-like one.
    noise = Image.open(io.BytesIO(png)).convert("RGB")
    photo = Image.open(io.BytesIO(mock.png[f"{LARGE}-photo"])).convert("RGB")
    print("\nmicro: encoder settings at 1024x1024, median ms and KB; noise and photo = the mock's two images")

    def psnr(original, data: bytes) -> float:
        """PSNR (dB) of the encoded image against the original: the quality a setting gives up."""
        from PIL import ImageChops, ImageStat

        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        mse = statistics.mean(v ** 2 for v in ImageStat.Stat(ImageChops.difference(original, decoded)).rms)
        return 10 * math.log10(255 ** 2 / mse) if mse else math.inf

    def enc(im, **kw) -> tuple[float, int, float]:
        out = io.BytesIO()
        im.save(out, **kw)
        return timed(lambda: im.save(io.BytesIO(), **kw)), out.tell(), psnr(im, out.getvalue())

    reps = 3 if quick else 5  # `timed` reads it: fewer repeats for the slow encoders
    settings = [(f"webp q90 method {m}{' (Pillow default)' if m == 4 else ''}",
                 {"format": "WEBP", "quality": 90, "method": m}) for m in range(7)]
    settings += [(f"webp q{q} method {m}", {"format": "WEBP", "quality": q, "method": m})
                 for q, m in ((80, 4), (80, 2), (75, 2))]
    settings += [("jpeg q90", {"format": "JPEG", "quality": 90}),
                 ("avif q80 (Pillow default speed)", {"format": "AVIF", "quality": 80}),
                 ("avif q80 speed 8", {"format": "AVIF", "quality": 80, "speed": 8}),
                 ("avif q80 speed 10", {"format": "AVIF", "quality": 80, "speed": 10})]
    print(f"  {'setting':34s} {'noise: ms':>10s} {'KB':>6s}   {'photo: ms':>10s} {'KB':>5s} {'PSNR':>8s}")
    for label, kw in settings:
        try:
            a, sa, _ = enc(noise, **kw)
            b, sb, db = enc(photo, **kw)
        except (OSError, ValueError, TypeError) as e:
            print(f"  {label}: {e}")
            continue
        print(f"  {label:34s} {a:10.1f} {sa / 1024:6.0f}   {b:10.1f} {sb / 1024:5.0f} {db:5.1f} dB")


# -------------------------------------------------------------------------------------------- memory


async def memory_runs(bench: Bench, mock: Proc, case_by_key: dict[str, Case]) -> None:
    """Idle RSS after the large c=8 run: as is, after malloc_trim(0), and with glibc knobs set."""
    variants = [("serve's own (proxy.http.server.tune_malloc)", {}),
                # Any MALLOC_* variable keeps serve's own settings off; a perturb byte of 0 is glibc's default.
                ("default glibc", {"MALLOC_PERTURB_": "0"}),
                ("MALLOC_MMAP_THRESHOLD_=1048576", {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
                ("MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"})]
    case = case_by_key["large_c8"]
    print("\nmemory: a fresh proxy (--worker proxy, SIGUSR1 = malloc_trim(0)), the c=8 1024 b64 run, 3 s idle")
    print(f"  {'variant':34s} {'start':>7s} {'peak':>7s} {'idle after':>11s} {'after trim':>11s} {'requests/s':>11s}")
    for i, (label, env) in enumerate(variants):
        proc = start_proxy(bench.tmp, mock.base_url, f"mem{i}", wrapper=True, env=env)
        try:
            bench.targets["mem"] = proc
            await asyncio.sleep(1.0)
            start = rss_mb(proc.pid)
            result = await bench.run(case, "mem", with_probe=False)
            await asyncio.sleep(3.0)
            idle = rss_mb(proc.pid)
            os.kill(proc.pid, signal.SIGUSR1)
            await asyncio.sleep(1.0)
            trimmed = rss_mb(proc.pid)
            print(f"  {label:34s} {start:5.0f} MB {result.rss_peak:5.0f} MB {idle:8.0f} MB {trimmed:8.0f} MB "
                  f"{result.rps:9.1f}/s")
        finally:
            bench.targets.pop("mem", None)
            proc.stop()


# ---------------------------------------------------------------------------------------------- main


def variants(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...]]]:
    """The extra proxy columns: --uvloop and each --variant NAME=PATCH+PATCH."""
    found = [("proxy+uvloop", ("uvloop",))] if args.uvloop else []
    for text in args.variant:
        name, _, spec = text.partition("=")
        patches = tuple(p for p in spec.split("+") if p)
        unknown = [p for p in patches if p not in PATCHES]
        if not name or not patches or unknown or name in ("direct", "proxy"):
            raise ValueError(f"--variant {text}: want NAME=PATCH+PATCH with patches from {', '.join(PATCHES)}")
        found.append((name, patches))
    return found


async def orchestrate(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.no_table and not (args.profile or args.memory):
        return 0
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qip-bench-gw-"))
    all_cases = cases(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        all_cases = [c for c in all_cases if c.key in wanted or c.key == "large_c1"]
    case_by_key = {c.key: c for c in all_cases}
    procs: list[Proc] = []
    loadgen = LoadGen()
    print(f"bench_gateway: {machine()}")
    print(f"load average at the start: {loadavg()} (other work on these cores shows in every number)")
    print("processes: mock upstream, proxy, load generator, and this orchestrator (the /health probe), all on "
          f"{os.cpu_count()} cores: they share the CPU, so the direct target is as contended as the proxy")
    try:
        mock = start_mock(tmp)
        procs.append(mock)
        proxies = ["proxy"]
        targets = {"direct": mock}
        proxy = start_proxy(tmp, mock.base_url, "proxy")
        procs.append(proxy)
        targets["proxy"] = proxy
        for name, patches in variants(args):
            variant = start_proxy(tmp, mock.base_url, name, patches=patches)
            procs.append(variant)
            targets[name] = variant
            proxies.append(name)
        for name in [n for n, wanted in zip(FORWARDERS, (args.floor, args.cut_through), strict=True) if wanted]:
            targets[name] = start_proxy(tmp, mock.base_url, name)  # the bare forwarders: yardsticks
            procs.append(targets[name])
            proxies.append(name)
        if args.workers > 1:  # the same proxy as N processes sharing the port
            name = f"proxy-w{args.workers}"
            workers = start_proxy(tmp, mock.base_url, name, workers=args.workers)
            procs.append(workers)
            targets[name] = workers
            proxies.append(name)
        await loadgen.start()
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            bench = Bench(args, tmp, loadgen, http, targets)
            await asyncio.sleep(1.0)  # settle, then the idle memory before any request
            memory = {}
            for p in proxies:
                memory["idle_start" if p == "proxy" else f"idle_start_{p}"] = rss_mb(targets[p].pid)
            for p in proxies:
                if p not in FORWARDERS:  # they convert nothing
                    await sanity(http, targets[p].base_url)
            # Warm-up, not recorded: every case on every target (connections, caches); the codecs warmed
            # up already in the sanity checks, so a conversion case gets one request.
            def serving(case: Case) -> list[str]:
                return (["direct"] if case.direct else []) + [
                    p for p in proxies if p not in FORWARDERS or case.key in FLOOR_CASES]

            for case in all_cases:
                conversion = case.body.get("output_format") is not None
                for target in serving(case):
                    await bench.run(case, target, count=1 if conversion else min(case.count, case.concurrency + 1),
                                    seconds=1, with_probe=False)
            for target in targets:
                await bench.measure_probe_cost(target)
            print(f"warm-up done after {time.monotonic() - started:.0f} s; {args.rounds} rounds of "
                  f"{len(all_cases)} cases; CPU per /health probe: " +
                  ", ".join(f"{t} {c * 1000:.2f} ms" for t, c in bench.probe_cpu.items()))
            results: dict[str, dict[str, list[RunResult]]] = {}
            for rnd in range(0 if args.no_table else args.rounds):
                for case in all_cases:
                    order = serving(case)
                    if rnd % 2:
                        order.reverse()
                    for target in order:
                        res = await bench.run(case, target)
                        results.setdefault(case.key, {}).setdefault(target, []).append(res)
                        if res.errors:
                            print(f"  ! {case.key} on {target}: {res.errors} errors, first: {res.first_error}")
                print(f"round {rnd + 1} done after {time.monotonic() - started:.0f} s")
            await asyncio.sleep(2.0)
            for p in proxies:
                memory["idle_after" if p == "proxy" else f"idle_after_{p}"] = rss_mb(targets[p].pid)
            if results:
                table, missed = build_table(results, case_by_key, proxies, memory)
                print()
                print(table)
                print()
                print(f"medians of {args.rounds} rounds; 'added' and 'ratio' are medians of the per-round pairs "
                      "(direct and proxy run back to back). Targets missed: " + str(missed))
                print("worst /health: the longest GET /health latency of a probe every 10 ms during the run; on "
                      "the direct row it is the mock's, the noise floor of this machine")
            if args.json:
                Path(args.json).write_text(json.dumps(
                    {k: {t: [r.__dict__ for r in rs] for t, rs in v.items()} for k, v in results.items()}, indent=1))
            if args.profile:
                await profile_runs(bench, case_by_key, 4 if args.quick else 8)
            if args.memory:
                await memory_runs(bench, mock, case_by_key)
        print(f"\nload average at the end: {loadavg()}; total {time.monotonic() - started:.0f} s")
        return 0
    finally:
        await loadgen.close()
        for proc in reversed(procs):
            proc.stop()
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests per run (~1 minute)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="also a proxy on uvloop, as one more column")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATCH+PATCH",
                        help="one more column: a proxy with these patches applied (" + ", ".join(PATCHES) + ")")
    parser.add_argument("--floor", action="store_true",
                        help="also a bare aiohttp forwarder (b64 cases only): the least a Python gateway costs")
    parser.add_argument("--cut-through", action="store_true",
                        help="also a bare forwarder that streams each answer through as it arrives (b64 cases only)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="also `serve --workers N` as one more column (CPU and memory summed over its processes)")
    parser.add_argument("--profile", action="store_true", help="py-spy the proxy during c=16 small and c=8 large")
    parser.add_argument("--profile-target", default="proxy", help="which proxy column --profile records")
    parser.add_argument("--profile-cases", default="small_c16,large_c8", metavar="KEY,KEY",
                        help="the cases --profile records (case keys, e.g. url_c8)")
    parser.add_argument("--micro", action="store_true", help="hot-path step costs and encoder settings")
    parser.add_argument("--memory", action="store_true", help="idle RSS after load: malloc_trim, glibc knobs")
    parser.add_argument("--no-table", action="store_true", help="skip the table: only --profile/--memory/--micro")
    parser.add_argument("--only", help="comma-separated case keys (large_c1 always runs: the reference)")
    parser.add_argument("--json", help="write every run's numbers here")
    parser.add_argument("--keep", help="keep logs and profiles in this folder")
    parser.add_argument("--burst", action="store_true",
                        help="instead of the table: bursts of thousands in flight against a slow mock (bench/burst.py)")
    parser.add_argument("--burst-rounds", type=int, default=2, help="--burst: interleaved rounds of the bursts")
    parser.add_argument("--burst-scale", type=float, default=1.0, help="--burst: every burst's size times this")
    parser.add_argument("--c1-rounds", type=int, default=12,
                        help="--burst: interleaved rounds of the c=1 rows (short runs; the verdict is the median of "
                             "the per-round ratios: one run's ratio swings +-0.5 on a shared machine)")
    parser.add_argument("--burst-only", metavar="KEY,KEY",
                        help="--burst: only these bursts (small_16, large_100, small_4000, small_10000; c1: the c=1 rows), "
                             "no c=1 rows unless c1 is named")
    parser.add_argument("--burst-targets", metavar="NAME,NAME",
                        help="--burst: only these columns (direct, floor, proxy, proxy-w2, variants)")
    parser.add_argument("--burst-profile", action="store_true",
                        help="--burst: then py-spy on --profile-target during a burst (--burst-profile-key)")
    parser.add_argument("--burst-profile-key", default="small_4000", help="--burst-profile: which burst")
    parser.add_argument("--worker", choices=["loadgen", "proxy", "floor", "burst"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--patches", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "loadgen":
        asyncio.run(loadgen_worker())
        return
    if args.worker == "proxy":
        proxy_worker(args.config, [p for p in args.patches.split(",") if p])
        return
    if args.worker == "floor":
        floor_worker(args.config, args.cut_through)
        return
    if args.worker == "burst" or args.burst:
        import burst  # here, not above: burst.py imports this module for its helpers

        if args.worker == "burst":
            burst.client_worker()
            return
        sys.exit(asyncio.run(burst.orchestrate(args)))
    if args.rounds < 1 or args.rounds > 9:
        parser.error("--rounds: 1 to 9")
    try:
        variants(args)
    except ValueError as e:
        parser.error(str(e))
    if args.keep is not None:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    code = asyncio.run(orchestrate(args))
    if args.micro:  # in this process, after the others are gone
        micro(args.quick)
    sys.exit(code)


if __name__ == "__main__":
    main()
