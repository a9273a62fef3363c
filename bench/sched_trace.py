"""Where the time of one c=1 request goes between the processes: the client, the mock, the target.

    python bench/sched_trace.py                  # the bare forwarder and the proxy, 64x64, 3 s each
    python bench/sched_trace.py --size 1024x1024 --seconds 5 --keep /tmp/trace

At c=1 the three processes hand the request on to each other, and each hand-over is a wake-up: the
client wakes the target, the target the mock, the mock the target, the target the client. This records
the scheduler's events (`perf sched record -a`, so it needs `perf` and root or a low
kernel.perf_event_paranoid) while one client sends requests one after another, and prints

- the cycle's four phases (median, from one wake-up to the next): the target from the client's request
  to its upstream call, the mock's turn, the target from the upstream's answer to its own, the client's
  turn (reading the answer and sending the next request);
- how often the target was asleep when the request, and the upstream's answer, came: a target still busy
  (or preempted by the process it just woke, and waiting for the CPU) is woken by nobody, and whatever it
  had left to do then runs before the input that came (the phases above count only complete cycles);
- the delay from a wake-up to running (median), by how long that CPU had been idle before: on a virtual
  machine a CPU that halts takes tens of microseconds to come back, and longer the longer it slept;
- without perf, first: the CPU time each process spends per request (client, mock, target), the two
  targets in turn for --rounds rounds, medians.

The phases include the wake-up delays, and perf's own cost inflates them all: compare the targets within
one run, not with bench_gateway.py's latencies. See docs/benchmarks.md for what it showed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gateway as gw  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
# perf sched timehist: "time [cpu] task[tid/pid] wait sch-delay run" and "... awakened: task[tid/pid]"
_SWITCH = re.compile(r"\s*([\d.]+)\s+\[(\d+)\]\s+(\S+?)(?:\[(\d+)(?:/(\d+))?\])?\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")
_WAKE = re.compile(r"\s*([\d.]+)\s+\[\d+\]\s+\S*?\[(\d+)(?:/(\d+))?\]\s+awakened: \S*?\[(\d+)(?:/(\d+))?\]")
PHASES = {("client", "target"): "target: request in -> upstream call", ("target", "mock"): "mock's turn",
          ("mock", "target"): "target: answer in -> answer out", ("target", "client"): "client's turn"}
IDLE_BUCKET_US = 100


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_at_a_time(http: aiohttp.ClientSession, url: str, size: str, seconds: float) -> int:
    body = json.dumps({"model": gw.MODEL, "prompt": "a cat", "size": size, "response_format": "b64_json"}).encode()
    done, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        async with http.post(f"{url}/v1/images/generations", data=body,
                             headers={"Content-Type": "application/json"}) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status} from {url}")
        done += 1
    return done


def timehist(data: Path, wakeups: bool) -> list[str]:
    cmd = ["perf", "sched", "timehist", "-i", str(data)] + (["-w"] if wakeups else [])
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()


def hand_overs(lines: list[str], roles: dict[str, str]) -> list[tuple[float, str, str]]:
    """(µs, waker, wakee) for each wake-up of one role by another, in order. A process that was not asleep
    when its input came (still running, or preempted and waiting for the CPU) is woken by nobody."""
    events = []
    for line in lines:
        m = _WAKE.match(line)
        if m:
            waker, wakee = roles.get(m.group(3) or m.group(2)), roles.get(m.group(5) or m.group(4))
            if waker and wakee and waker != wakee:
                events.append((float(m.group(1)) * 1e6, waker, wakee))
    return events


def asleep_shares(events: list[tuple[float, str, str]], requests: int) -> dict[str, float]:
    """How often the target was asleep when the client's request / the mock's answer came (share of requests)."""
    return {who: sum(1 for _, waker, wakee in events if (waker, wakee) == (who, "target")) / max(1, requests)
            for who in ("client", "mock")}


def phases(events: list[tuple[float, str, str]]) -> dict[str, float]:
    """Median µs between consecutive hand-overs (a wake-up of one role by another)."""
    spans: dict[str, list[float]] = defaultdict(list)
    for (t0, a0, b0), (t1, a1, _) in zip(events, events[1:], strict=False):
        if (a0, b0) in PHASES and b0 == a1:
            spans[PHASES[(a0, b0)]].append(t1 - t0)
    return {name: statistics.median(spans[name]) for name in PHASES.values() if spans[name]}


def wake_delays(lines: list[str], pids: set[str]) -> dict[int, list[float]]:
    """Wake-up delays (µs) of the three processes, by the idle time of that CPU just before."""
    idle_before: dict[str, float] = {}
    found: dict[int, list[float]] = defaultdict(list)
    for line in lines:
        m = _SWITCH.match(line)
        if not m:
            continue
        cpu, task = m.group(2), m.group(3)
        if task == "<idle>":
            idle_before[cpu] = float(m.group(8)) * 1e3  # timehist prints ms
        elif (m.group(5) or m.group(4)) in pids and cpu in idle_before:
            idle = idle_before.pop(cpu)
            found[min(int(idle // IDLE_BUCKET_US), 6) * IDLE_BUCKET_US].append(float(m.group(7)) * 1e3)
    return found


async def cpu_rounds(procs: dict[str, gw.Proc], mock: gw.Proc, args: argparse.Namespace) -> dict[str, list[float]]:
    """Without perf: the CPU each process spends per request (client, mock, target), the targets in turn for
    args.rounds rounds (the machine's pace drifts within minutes), medians."""
    found: dict[str, list[list[float]]] = {name: [] for name in procs}
    async with contextlib.AsyncExitStack() as stack:
        sessions = {name: await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1))) for name in procs}
        for name, proc in procs.items():
            await one_at_a_time(sessions[name], proc.base_url, args.size, 1.0)  # warm: connections, caches
        for _ in range(args.rounds):
            for name, proc in procs.items():
                before = own_cpu(), process_cpu(mock.pid), process_cpu(proc.pid)
                n = await one_at_a_time(sessions[name], proc.base_url, args.size, args.seconds / 2)
                after = own_cpu(), process_cpu(mock.pid), process_cpu(proc.pid)
                found[name].append([(b - a) / n * 1e6 for a, b in zip(before, after, strict=True)])
    return {name: [statistics.median(column) for column in zip(*rows, strict=True)] for name, rows in found.items()}


async def trace(name: str, proc: gw.Proc, mock: gw.Proc, args: argparse.Namespace, out: Path) -> dict:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        await one_at_a_time(http, proc.base_url, args.size, 1.0)  # warm: connections, caches
        data = out / f"{name}.perf"
        perf = subprocess.Popen(["perf", "sched", "record", "-a", "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1.0)  # perf's start
        traced = await one_at_a_time(http, proc.base_url, args.size, args.seconds)
        perf.send_signal(signal.SIGINT)
        perf.wait()
    roles = {str(os.getpid()): "client", str(mock.pid): "mock", str(proc.pid): "target"}
    events = hand_overs(timehist(data, wakeups=True), roles)
    return {"requests": traced, "phases": phases(events), "asleep": asleep_shares(events, traced),
            "wakes": wake_delays(timehist(data, wakeups=False), set(roles))}


def report(results: dict[str, dict]) -> None:
    names = list(results)
    print("\n| per request (median µs) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, who in enumerate(("client", "mock", "target")):
        print(f"| CPU time of the {who} (no perf, interleaved) | " + " | ".join(f"{results[n]['cpu_us'][i]:.0f}" for n in names) + " |")
    for phase in PHASES.values():
        print(f"| {phase} | " + " | ".join(f"{results[n]['phases'].get(phase, float('nan')):.0f}" for n in names) + " |")
    print("| the cycle | " + " | ".join(f"{sum(results[n]['phases'].values()):.0f}" for n in names) + " |")
    for who, what in (("client", "the request"), ("mock", "the upstream's answer")):
        print(f"| the target asleep when {what} came (share of requests) | "
              + " | ".join(f"{results[n]['asleep'][who]:.0%}" for n in names) + " |")
    print("\nwake-up delay (median µs, number of wake-ups) by the CPU's idle time before it:")
    buckets = sorted({b for n in names for b in results[n]["wakes"]})
    print("| idle before | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for b in buckets:
        label = f"{b}-{b + IDLE_BUCKET_US} µs" if b < 6 * IDLE_BUCKET_US else f">= {b} µs"
        cells = []
        for n in names:
            d = results[n]["wakes"].get(b, [])
            cells.append(f"{statistics.median(d):.0f} ({len(d)})" if d else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="64x64", choices=["64x64", "1024x1024"])
    parser.add_argument("--seconds", type=float, default=3.0, help="of requests per target under perf")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds of the CPU pass (each seconds/2)")
    parser.add_argument("--keep", type=Path, help="keep the perf data and logs in this folder")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")
    out = args.keep or Path(tempfile.mkdtemp(prefix="sched-trace-"))
    out.mkdir(parents=True, exist_ok=True)
    mock = gw.start_mock(out)
    procs: dict[str, gw.Proc] = {}
    results = {}
    try:
        for name in ("floor", "proxy"):
            procs[name] = gw.start_proxy(out, mock.base_url, name)
        cpu = await cpu_rounds(procs, mock, args)
        for name, proc in procs.items():
            results[name] = {**await trace(name, proc, mock, args, out), "cpu_us": cpu[name]}
            if not results[name]["phases"]:
                sys.exit(f"perf recorded no scheduler events (is kernel.perf_event_paranoid too high?); see {out}")
    finally:
        for proc in procs.values():
            proc.stop()
        mock.stop()
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    print(f"{args.size} at c=1: CPU from {args.rounds} interleaved rounds of {args.seconds / 2:.1f} s per target, "
          f"perf {args.seconds:.0f} s per target; "
          + ", ".join(f"{n}: {r['requests']} requests traced" for n, r in results.items()))
    report(results)


if __name__ == "__main__":
    asyncio.run(main())
