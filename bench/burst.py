"""bench_gateway.py --burst: thousands of requests in flight at once against a slow upstream (a benchmark).

    python bench/bench_gateway.py --burst                 # c=1 rows, then bursts of 16, 100 (1024), 4,000, 10,000
    python bench/bench_gateway.py --burst --burst-profile # then py-spy on the proxy during a 4,000 burst
    python bench/bench_gateway.py --burst --burst-scale 0.25   # every burst a quarter the size (a quick look)

The mock upstream answers each generation after a delay (PUT /control/delay), like a provider that takes
seconds per image; N clients, each on its own connection, send at the same moment (one or more client
processes), and every request is in flight at once while the mock sleeps. Targets, interleaved per round:
the mock itself ("direct"), the bare aiohttp forwarder (bench_gateway.py --floor), the proxy, and
`serve --workers 2`. For each burst and target:

- CPU per request: the CPU the target's process(es) used from the first request to the last answer, less
  what the same process(es) use idle over the same time (measured before the bursts), per answered request;
- RSS per request in flight: the peak resident memory during the burst (VmHWM, reset before it) less the
  resident memory just before it, over the requests in flight; summed over a target's processes. Each burst
  gets fresh target processes (warmed up with 20 requests), so no earlier burst's freed heap hides it;
- added p50 / p99: each request's latency less the mock's delay;
- answered and errors (a refused connection, a timeout, a non-200 answer, a short body).

The c=1 rows (added p50 over the mock answering at once) reuse bench_gateway.py's own runs: --c1-rounds
short rounds (default 12), the targets in turn; the verdict is the median of the per-round ratios, with the
middle half of them beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import bench_gateway as gw

HERE = Path(__file__).resolve().parent
# Requests per target in each c=1 round (about half a second of each).
C1_COUNTS = {"small_c1": 300, "large_c1": 40}


@dataclass(frozen=True)
class Burst:
    key: str
    label: str
    size: str
    clients: int  # requests in flight at once
    waves: int  # each client sends this many requests, one after the other
    delay: float  # the mock's delay (s)
    targets: tuple[str, ...]
    procs: int = 1  # client processes (a 10,000 burst is more than one Python client keeps up with)
    min_bytes: int = 1000


def bursts(scale: float, workers: int, variants: tuple[str, ...] = ()) -> list[Burst]:
    def n(count: int) -> int:
        return max(4, int(count * scale))

    w = f"proxy-w{workers}"
    every = ("direct", "floor", "proxy", w, *variants)
    return [
        Burst("small_16", "64x64, 16 in flight", gw.SMALL, 16, 50, 0.25, every),
        Burst("large_100", "1024x1024, 100 in flight", gw.LARGE, n(100), 1, 3.0, every, min_bytes=4_000_000),
        Burst("small_4000", f"64x64, {n(4000):,} in flight", gw.SMALL, n(4000), 1, 5.0, every),
        Burst("small_10000", f"64x64, {n(10000):,} in flight", gw.SMALL, n(10000), 1, 5.0, ("direct", w, *variants),
              procs=2),
    ]


# --------------------------------------------------------------------------------------- the clients


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def burst_run(spec: dict) -> dict:
    """spec: url, body, clients, waves, min_bytes -> each request's latency (ms), errors, wall time."""
    raise_nofile()
    payload = json.dumps(spec["body"]).encode()
    latencies: list[float] = []
    errors: list[str] = []
    largest = 0
    go = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as http:

        async def client() -> None:
            nonlocal largest
            await go.wait()
            for _ in range(spec["waves"]):
                t0 = time.perf_counter()
                try:
                    async with http.post(spec["url"], data=payload, headers={"Content-Type": "application/json"}) as r:
                        data = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
                    if len(data) < spec["min_bytes"] or b'"b64_json"' not in data[:300]:
                        raise RuntimeError(f"short answer ({len(data)} bytes): {data[:200]!r}")
                except Exception as e:  # counted and reported, never hidden
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                largest = max(largest, len(data))

        tasks = [asyncio.ensure_future(client()) for _ in range(spec["clients"])]
        await asyncio.sleep(0.05)  # every client waiting on the event
        t0 = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return {"lat_ms": latencies, "errors": len(errors), "first_error": errors[0] if errors else None, "wall": wall,
            "answer_bytes": largest}


def client_worker() -> None:
    """--worker burst: one spec on stdin, one result on stdout."""
    spec = json.loads(sys.stdin.readline())
    sys.stdout.write(json.dumps(asyncio.run(burst_run(spec))) + "\n")
    sys.stdout.flush()


async def run_clients(spec: dict, procs: int) -> dict:
    """The burst from `procs` client processes at once (the clients split between them); results merged."""
    share = [spec["clients"] // procs + (i < spec["clients"] % procs) for i in range(procs)]
    started = []
    for clients in share:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "bench_gateway.py"), "--worker", "burst",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024, cwd=gw.ROOT)
        started.append((proc, {**spec, "clients": clients}))
    await asyncio.sleep(1.0)  # interpreters up (imports) before the burst starts
    for proc, part in started:
        proc.stdin.write((json.dumps(part) + "\n").encode())
        await proc.stdin.drain()
    outs = await asyncio.gather(*(proc.communicate() for proc, _ in started))
    merged: dict = {"lat_ms": [], "errors": 0, "first_error": None, "wall": 0.0, "answer_bytes": 0}
    for stdout, _ in outs:
        if not stdout.strip():
            raise RuntimeError("a burst client exited without a result")
        out = json.loads(stdout)
        merged["lat_ms"] += out["lat_ms"]
        merged["errors"] += out["errors"]
        merged["first_error"] = merged["first_error"] or out["first_error"]
        merged["wall"] = max(merged["wall"], out["wall"])
        merged["answer_bytes"] = max(merged["answer_bytes"], out["answer_bytes"])
    return merged


# ------------------------------------------------------------------------------------ one burst


@dataclass
class BurstResult:
    ok: int
    errors: int
    first_error: str | None
    cpu_ms: float  # per answered request, idle use taken off
    rss_kb: float  # peak over idle, per request in flight
    p50: float  # added over the delay (ms)
    p99: float
    wall: float
    answer_bytes: int  # the largest answer's body


async def set_delay(http: aiohttp.ClientSession, mock: gw.Proc, seconds: float) -> None:
    async with http.put(f"{mock.base_url}/control/delay", params={"seconds": str(seconds)}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"mock delay: HTTP {resp.status}")


async def idle_cpu_rate(pid: int, seconds: float = 3.0) -> float:
    """CPU seconds per second the process family uses doing nothing (timers, the memory trim check)."""
    before = gw.cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (gw.cpu_seconds(pid) - before) / seconds


async def one_burst(burst: Burst, proc: gw.Proc, idle_rss_mb: float, idle_rate: float) -> BurstResult:
    spec = {"url": f"{proc.base_url}/v1/images/generations", "body": gw._body(burst.size),
            "clients": burst.clients, "waves": burst.waves, "min_bytes": burst.min_bytes}
    gw.reset_peak(proc.pid)
    cpu_before = gw.cpu_seconds(proc.pid)
    t0 = time.perf_counter()
    out = await run_clients(spec, burst.procs)
    elapsed = time.perf_counter() - t0
    cpu = gw.cpu_seconds(proc.pid) - cpu_before - idle_rate * elapsed
    peak = gw.peak_mb(proc.pid)
    lat = [v - burst.delay * 1000 for v in out["lat_ms"]]
    ok = len(lat)
    return BurstResult(ok=ok, errors=out["errors"], first_error=out["first_error"],
                       cpu_ms=cpu * 1000 / ok if ok else math.nan,
                       rss_kb=(peak - idle_rss_mb) * 1024 / burst.clients,
                       p50=gw.percentile(lat, 0.5), p99=gw.percentile(lat, 0.99), wall=out["wall"],
                       answer_bytes=out["answer_bytes"])


# ------------------------------------------------------------------------------------------ the table


def _ms(v: float) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:+.2f} ms" if abs(v) < 10 else (f"{v:+.0f} ms" if abs(v) < 1000 else f"{v / 1000:+.2f} s")


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def table(c1: dict, results: dict, plan: list[Burst], columns: list[str], w: str, answer_bytes: dict[str, int]) -> tuple[str, list[str]]:
    """Markdown: one row per figure, a column per target; and the targets' verdicts."""
    med = gw.median
    lines = ["| figure | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    verdicts: list[str] = []

    def row(label: str, values: dict[str, str]) -> None:
        lines.append(f"| {label} | " + " | ".join(values.get(c, "") for c in columns) + " |")

    for key, label in (("small_c1", "64x64"), ("large_c1", "1024x1024")):
        if key not in c1:
            continue
        direct = c1[key].get("direct", [])
        per_round = {t: [a.p50 - b.p50 for a, b in zip(rs, direct, strict=False)]
                     for t, rs in c1[key].items() if t != "direct"}
        added = {t: med(v) for t, v in per_round.items()}
        row(f"added p50, c=1, {label} (direct: its p50)",
            {"direct": f"{med([r.p50 for r in direct]):.2f} ms" if direct else "-", **{t: _ms(v) for t, v in added.items()}})
        ratios = sorted(_ratio(p, f) for p, f in zip(per_round.get("proxy", []), per_round.get("floor", []), strict=False))
        ratios = [r for r in ratios if not math.isnan(r)]
        if not ratios:
            continue
        r, quart = med(ratios), (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])
        verdicts.append(f"added p50 at c=1, {label}: proxy {r:.2f}x the forwarder's (median of {len(ratios)} "
                        f"interleaved rounds, middle half {quart[0]:.2f}-{quart[1]:.2f}x; target <= 1.5x): "
                        + ("met" if r <= 1.5 else "MISSED"))

    def get(key: str, target: str, name: str) -> float:
        return med([getattr(r, name) for r in results.get(key, {}).get(target, [])])

    for b in plan:
        if b.key not in results:
            continue
        res = results[b.key]
        row(f"**{b.label}** (mock delay {b.delay:g} s{', ' + str(b.waves) + ' waves' if b.waves > 1 else ''}): "
            "answered / errors",
            {t: f"{sum(r.ok for r in rs) // len(rs):,} / {sum(r.errors for r in rs)}" for t, rs in res.items()})
        row("CPU per request", {t: f"{get(b.key, t, 'cpu_ms'):.2f} ms" for t in res})
        # Not the mock's: it is not started afresh for each burst.
        row("RSS per request in flight (peak over idle)",
            {t: f"{get(b.key, t, 'rss_kb'):.0f} KB" if t != "direct" else "-" for t in res})
        row("added p50 / p99 over the delay",
            {t: f"{_ms(get(b.key, t, 'p50'))} / {_ms(get(b.key, t, 'p99'))}" for t in res})
    if "small_4000" in results and "floor" in results["small_4000"]:
        cpu, floor_cpu = get("small_4000", "proxy", "cpu_ms"), get("small_4000", "floor", "cpu_ms")
        r = _ratio(cpu, floor_cpu)
        verdicts.append(f"CPU per request at 4,000: proxy {r:.2f}x the forwarder's (<= 1.5x): "
                        + ("met" if r <= 1.5 else "MISSED"))
        r = _ratio(cpu, get("small_16", "proxy", "cpu_ms"))
        verdicts.append(f"CPU per request at 4,000: proxy {r:.2f}x its own at 16 (<= 1.2x): "
                        + ("met" if r <= 1.2 else "MISSED"))
        r = _ratio(get("small_4000", "proxy", "rss_kb"), get("small_4000", "floor", "rss_kb"))
        verdicts.append(f"RSS per request in flight at 4,000: proxy {r:.2f}x the forwarder's (<= 1.2x): "
                        + ("met" if r <= 1.2 else "MISSED"))
    if "large_100" in results:
        answer_kb = answer_bytes["large_100"] / 1024  # the whole JSON answer: ~4.2 MB of base64
        kb = get("large_100", "proxy", "rss_kb")
        verdicts.append(f"RSS per 1024x1024 request in flight: proxy {kb / answer_kb:.2f}x one answer (< 2x): "
                        + ("met" if kb < 2 * answer_kb else "MISSED"))
    if "small_10000" in results and w in results["small_10000"]:
        rs = results["small_10000"][w]
        bad = sum(r.errors for r in rs)
        verdicts.append(f"10,000 in flight with {w}: {min(r.ok for r in rs):,} answered, {bad} errors: "
                        + ("met" if not bad and min(r.ok for r in rs) == plan[-1].clients else "MISSED"))
    return "\n".join(lines), verdicts


# ------------------------------------------------------------------------------------------ profile


async def profile_burst(burst: Burst, proc: gw.Proc, tmp: Path) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("\nprofile: py-spy is not installed (pip install py-spy, the bench extra); skipped")
        return
    raw = tmp / f"burst-profile-{burst.key}.txt"
    seconds = int(burst.delay * burst.waves + 8)
    spy_proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(proc.pid), "--rate", "250", "--duration", str(seconds), "--nonblocking",
        "--threads", "--format", "raw", "-o", str(raw),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(0.5)
    spec = {"url": f"{proc.base_url}/v1/images/generations", "body": gw._body(burst.size),
            "clients": burst.clients, "waves": burst.waves, "min_bytes": burst.min_bytes}
    out = await run_clients(spec, burst.procs)
    _, err = await asyncio.wait_for(spy_proc.communicate(), seconds + 60)
    if spy_proc.returncode != 0 or not raw.exists():
        print(f"  py-spy failed ({spy_proc.returncode}): {err.decode(errors='replace')[-500:]}")
        return
    print(f"\nprofile: py-spy on {proc.name} during {burst.label} ({len(out['lat_ms'])} answered):")
    print(gw.summarize_collapsed(raw, top=25))
    print(f"  stacks: {raw}")


# -------------------------------------------------------------------------------------------- main


async def orchestrate(args: argparse.Namespace) -> int:
    raise_nofile()
    started = time.monotonic()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qip-bench-burst-"))
    tmp.mkdir(parents=True, exist_ok=True)
    w = f"proxy-w{args.workers if args.workers > 1 else 2}"
    plan = [b for b in bursts(args.burst_scale, int(w.rsplit("w", 1)[1]), tuple(n for n, _ in gw.variants(args)))
            if not args.burst_only or b.key in args.burst_only.split(",")]
    columns = ["direct", "floor", "proxy", w]
    patches = dict(gw.variants(args))  # --variant NAME=PATCH+PATCH: more proxy columns
    columns += list(patches)
    if args.burst_targets:  # only these columns (a quick look at a few)
        columns = [c for c in columns if c in args.burst_targets.split(",")]
    print(f"bench_gateway --burst: {gw.machine()}")
    print(f"load average at the start: {gw.loadavg()}")
    procs: list[gw.Proc] = []
    loadgen = gw.LoadGen()
    try:
        mock = gw.start_mock(tmp)
        procs.append(mock)
        targets = {"direct": mock}
        def start(name: str) -> gw.Proc:
            return gw.start_proxy(tmp, mock.base_url, name, workers=2 if name == w else 1,
                                  patches=patches.get(name, ()))

        for name in columns:
            if name != "direct":
                targets[name] = start(name)
            procs.append(targets[name])
        await loadgen.start()
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            bench = gw.Bench(args, tmp, loadgen, http, targets)
            c1_cases = [c for c in gw.cases(args.quick) if c.key in ("small_c1", "large_c1")]
            await set_delay(http, mock, 0)
            for case in c1_cases:  # warm-up: connections, caches, the codecs' first call
                for t in columns:
                    await bench.run(case, t, count=20, seconds=2, with_probe=False)
            c1: dict[str, dict[str, list]] = {}
            # Many short rounds, the targets in turn (the order reversed every other round): the machine's
            # pace drifts by tens of percent within a minute, and a round's ratio compares targets measured
            # within a second or two of each other.
            for rnd in range(args.c1_rounds if not args.burst_only or "c1" in args.burst_only.split(",") else 0):
                for case in c1_cases:
                    order = columns[::-1] if rnd % 2 else columns
                    for t in order:
                        res = await bench.run(case, t, count=C1_COUNTS[case.key], seconds=2, with_probe=False)
                        c1.setdefault(case.key, {}).setdefault(t, []).append(res)
            print(f"c=1 rows done after {time.monotonic() - started:.0f} s; load {gw.loadavg()}")
            rates = {t: await idle_cpu_rate(targets[t].pid) for t in columns}
            print("idle CPU: " + ", ".join(f"{t} {rates[t] * 1000:.1f} ms/s" for t in columns))
            results: dict[str, dict[str, list[BurstResult]]] = {}
            answer_bytes: dict[str, int] = {}
            for rnd in range(args.burst_rounds):
                for b in plan:
                    order = [t for t in columns if t in b.targets]
                    if not order:
                        continue
                    if rnd % 2:
                        order.reverse()
                    for t in order:
                        # A fresh process for each burst: memory an earlier burst left in its heap would hide
                        # what this one needs. Warmed up with a few requests, then its idle memory.
                        if t != "direct":
                            procs.remove(targets[t])
                            targets[t].stop()
                            targets[t] = start(t)
                            procs.append(targets[t])
                        await set_delay(http, mock, 0)
                        case = next(c for c in c1_cases if c.body["size"] == b.size)
                        await bench.run(case, t, count=20, seconds=3, with_probe=False)
                        await asyncio.sleep(1.5)  # the memory trim after a burst (1 s idle) has run
                        idle_rss = gw.rss_mb(targets[t].pid)
                        await set_delay(http, mock, b.delay)
                        res = await one_burst(b, targets[t], idle_rss, rates[t])
                        answer_bytes[b.key] = max(answer_bytes.get(b.key, 0), res.answer_bytes)
                        results.setdefault(b.key, {}).setdefault(t, []).append(res)
                        print(f"  {b.key} on {t}: {res.ok} answered, {res.errors} errors, CPU {res.cpu_ms:.2f} ms/req, "
                              f"RSS {res.rss_kb:.0f} KB/req over idle {idle_rss:.0f} MB, added p50 {res.p50:.0f} ms, "
                              f"wall {res.wall:.1f} s" + (f"; first error: {res.first_error}" if res.first_error else ""),
                              flush=True)
                print(f"round {rnd + 1} done after {time.monotonic() - started:.0f} s; load {gw.loadavg()}")
            text, verdicts = table(c1, results, plan, columns, w, answer_bytes)
            print()
            print(text)
            print()
            for v in verdicts:
                print("- " + v)
            print(f"\nload average at the end: {gw.loadavg()}; {args.c1_rounds} c=1 rounds, {args.burst_rounds} burst "
                  f"rounds; total {time.monotonic() - started:.0f} s")
            if args.burst_profile:
                b = next((b for b in plan if b.key == args.burst_profile_key), plan[-1])
                await set_delay(http, mock, b.delay)
                await profile_burst(b, targets[args.profile_target], tmp)
        return 0
    finally:
        await loadgen.close()
        for proc in reversed(procs):
            proc.stop()
        if args.keep is None:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp, ignore_errors=True)
