"""Budget checks on PostgreSQL from outside: a running `serve` with keys that have budgets, the counters in
a real PostgreSQL (initdb + pg_ctl, a throwaway cluster) reached through a relay that adds network delay.

Prints the latency of a burst of concurrent budgeted requests (and of unbudgeted ones, the baseline),
then what clients see when the proxy's backend connections are killed (pg_terminate_backend) and when the
server restarts; and whether the database URL's password reached the proxy's log. No assertions: numbers.

    python bench/pg_budgets.py [--rtt-ms 4] [--concurrency 64] [--requests 256]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import aiohttp
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.fake_openai_upstream import free_port  # noqa: E402
from tests.services import PostgresServer, postgres_bindir  # noqa: E402

PASSWORD = "pg-s3cret-pw-4711"


async def relay(listen_port: int, target_port: int, delay: float) -> asyncio.Server:
    """A TCP relay that delivers each chunk `delay` s after it arrived, in order (a database farther away)."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + delay, data))
        except ConnectionError:
            pass
        queue.put_nowait(None)
        await asyncio.gather(task, return_exceptions=True)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # the relay closing at the end
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", listen_port)


def psql(pg: PostgresServer, sql: str) -> str:
    out = subprocess.run([*pg.user_prefix, os.path.join(pg.bindir, "psql"), "-h", "127.0.0.1", "-p", str(pg.port),
                          "-U", "postgres", "-d", "postgres", "-Atc", sql], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


LAST_ERROR: list = []


async def one(client: Client) -> tuple[float, int, str]:
    """One images.generate as the openai client sends it (aiohttp: less CPU in this process than openai's)."""
    t = time.perf_counter()
    async with client.session.post(f"{client.url}/images/generations", headers={"Authorization": f"Bearer {client.key}"},
                                   json={"model": "qwen-image-placeholder", "prompt": "a fox", "size": "64x64"}) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            LAST_ERROR[:] = [r.status, r.headers.get("Retry-After"), body]
        code = body.get("error", {}).get("code", "") if r.status != 200 else ""
        return time.perf_counter() - t, r.status, code


@dataclass
class Client:
    session: aiohttp.ClientSession
    url: str
    key: str


async def burst(clients: list[Client], n: int, concurrency: int) -> tuple[list[float], dict]:
    gate = asyncio.Semaphore(concurrency)
    counts: dict = {}

    async def go(i: int) -> float:
        async with gate:
            took, status, code = await one(clients[i % len(clients)])
        counts[(status, code)] = counts.get((status, code), 0) + 1
        return took

    took = await asyncio.gather(*(go(i) for i in range(n)))
    return sorted(took), counts


def describe(name: str, took: list[float], counts: dict, wall: float) -> None:
    p = lambda q: took[min(len(took) - 1, int(q * len(took)))] * 1000  # noqa: E731
    print(f"  {name:<22} p50 {p(0.5):7.1f} ms  p95 {p(0.95):7.1f} ms  max {took[-1] * 1000:7.1f} ms  "
          f"{len(took) / wall:6.1f} req/s  {dict(sorted(counts.items()))}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtt-ms", type=float, default=4.0, help="round trip added between proxy and database")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--outage", type=float, default=0, help="seconds the database stays away (a request every 0.2 s)")
    args = ap.parse_args()

    bindir = postgres_bindir()
    assert bindir, "PostgreSQL is not installed"
    pg = PostgresServer(bindir)
    pg.init()
    pg.start()
    relay_port = free_port()  # in a process of its own: this one is busy being the clients
    relay_proc = subprocess.Popen([sys.executable, __file__, "--relay", str(relay_port), str(pg.port),
                                   str(args.rtt_ms / 2000)])
    tmp = tempfile.mkdtemp(prefix="qip-pgbench-")
    keys = [{"name": f"k{i}", "key": f"sk-budget-{i:02d}-0000000000", "budget": {"images_per_day": 1_000_000}}
            for i in range(8)] + [{"name": "free", "key": "sk-free-00000000000"}]
    cfg = {"server": {"api_keys": keys},
           "store": {"path": f"{tmp}/images"},
           "usage": {"database_url": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{relay_port}/postgres"},
           "providers": {"placeholder": {"kind": "placeholder"}},
           # 64x64 pictures: the requests cost little CPU, so the budget checks are what is measured
           "size_tables": {"tiny": {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64"}}}},
           "models": {"qwen-image-placeholder": {"sizes": "tiny", "routes": ["placeholder"]}}}
    with open(f"{tmp}/models.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    port = free_port()
    log = open(f"{tmp}/serve.log", "w")  # noqa: SIM115 - the server's, until it ends
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", f"{tmp}/models.yaml",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=log, stderr=log)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(60))
    url = f"http://127.0.0.1:{port}/v1"
    budgeted = [Client(session, url, k["key"]) for k in keys[:-1]]
    free = [Client(session, url, keys[-1]["key"])]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with session.get(f"{url}/models", headers={"Authorization": f"Bearer {keys[-1]['key']}"}) as r:
                    if r.status == 200:
                        break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                await asyncio.sleep(0.2)
        await burst(budgeted, 16, 8)  # warm up
        print(f"burst: {args.requests} requests, {args.concurrency} at once, database {args.rtt_ms} ms away")
        for name, clients in (("no budget (baseline)", free), ("budgeted keys", budgeted)):
            t = time.perf_counter()
            took, counts = await burst(clients, args.requests, args.concurrency)
            describe(name, took, counts, time.perf_counter() - t)

        killed = psql(pg, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                          "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
        print(f"pg_terminate_backend: {killed} proxy connections killed; then requests one after another:")
        seen = [(await one(budgeted[i % 8]))[1:] for i in range(10)]
        print("  ", seen)

        pg.stop()
        print("PostgreSQL stopped; 5 requests one after another (seconds, status, code):")
        print("  ", [(round(t, 2), *rest) for t, *rest in [await one(budgeted[i]) for i in range(5)]])
        print("   the last error (status, Retry-After, body):", LAST_ERROR)
        if args.outage:
            t0, slow, seen_codes = time.monotonic(), [], {}
            while time.monotonic() - t0 < args.outage:
                took, status, code = await one(budgeted[0])
                seen_codes[(status, code)] = seen_codes.get((status, code), 0) + 1
                if took > 0.5:
                    slow.append(round(took, 1))
                await asyncio.sleep(0.2)
            print(f"   {args.outage:.0f} s away: {seen_codes}; answers slower than 0.5 s: {slow}")
        pg.start()
        t0 = time.monotonic()
        print("PostgreSQL started again; requests every 100 ms until 10 in a row pass:")
        history, ok, first_ok = [], 0, None
        while ok < 10 and time.monotonic() - t0 < 60:
            _, status, code = await one(budgeted[len(history) % 8])
            history.append(status)
            ok = ok + 1 if status == 200 else 0
            if status == 200 and first_ok is None:
                first_ok = time.monotonic() - t0
            await asyncio.sleep(0.1)
        failed = [s for s in history if s != 200]
        print(f"   {len(failed)} failed after the restart {sorted(set(failed))}; recovered "
              f"{'yes' if ok >= 10 else 'NO'}, first 200 after {first_ok or 0:.1f} s; statuses: {history}")
        t = time.perf_counter()
        took, counts = await burst(budgeted, args.requests, args.concurrency)
        describe("budgeted after restart", took, counts, time.perf_counter() - t)
    finally:
        await session.close()
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        relay_proc.terminate()
        relay_proc.wait(timeout=30)
        pg.remove()
    with open(f"{tmp}/serve.log") as f:
        text = f.read()
    print(f"password in the proxy's log: {'YES' if PASSWORD in text else 'no'} ({len(text.splitlines())} lines, "
          f"{tmp}/serve.log)")


async def serve_relay(listen: int, target: int, delay: float) -> None:
    server = await relay(listen, target, delay)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--relay"]:
        asyncio.run(serve_relay(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
    else:
        asyncio.run(main())
