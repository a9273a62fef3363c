"""The serve loop's memory policy (proxy.http.server): glibc settings unless the operator set their own, and
malloc_trim once a burst of image requests is over, never in the middle of one."""

from __future__ import annotations

import asyncio

import pytest

from proxy.http import server

MB = 1024 * 1024


class FakeLibc:
    """glibc as the trimming sees it: resident memory, and malloc_trim giving back all but `kept`."""

    def __init__(self):
        self.trims = 0
        self.mallopts: list[tuple[int, int]] = []
        self.resident = 60 * MB
        self.kept = 62 * MB  # what a trim cannot give back (live buffers)

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        self.resident = min(self.resident, self.kept)
        return 1

    def mallopt(self, param: int, value: int) -> int:
        self.mallopts.append((param, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(server, "_glibc", lambda: fake)
    monkeypatch.setattr(server, "_resident_bytes", lambda: fake.resident)
    monkeypatch.setattr(server, "TRIM_CHECK_SECONDS", 0.01)
    monkeypatch.setattr(server, "TRIM_IDLE_SECONDS", 0.05)
    monkeypatch.setattr(server, "TRIM_BUSY_SECONDS", 0.6)
    monkeypatch.setattr(server, "TRIM_QUIET_SECONDS", 0.16)
    return fake


async def run_for(seconds: float, busy) -> None:
    task = asyncio.create_task(server._trim_forever(busy))
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_freed_memory_goes_back_once_the_burst_is_over_not_during_it(libc):
    busy = [True]
    task = asyncio.create_task(server._trim_forever(lambda: busy[0]))
    await asyncio.sleep(0.05)
    libc.resident = 300 * MB  # a burst of 1024x1024 answers
    await asyncio.sleep(0.3)
    assert libc.trims == 0  # still serving: the next request would fault the same pages in again
    busy[0] = False
    await asyncio.sleep(0.2)
    assert libc.trims == 1 and libc.resident == 62 * MB
    await asyncio.sleep(0.2)
    assert libc.trims == 1  # given back: under the growth threshold, nothing more to do
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_load_that_never_pauses_is_still_trimmed_now_and_then(libc):
    task = asyncio.create_task(run_for(1.0, lambda: True))
    await asyncio.sleep(0.05)
    libc.resident = 300 * MB
    await task
    assert libc.trims == 1  # after TRIM_BUSY_SECONDS, not at every check


async def test_small_growth_is_left_alone(libc):
    task = asyncio.create_task(run_for(0.3, lambda: False))
    await asyncio.sleep(0.05)
    libc.resident = 64 * MB
    await task
    assert libc.trims == 0


async def test_an_idle_server_looks_less_often_and_a_burst_brings_the_looks_back(libc, monkeypatch):
    """Idle with nothing to give back, the looks at resident memory slow down (a server nobody calls wakes
    a few times a second, not a hundred): a burst that starts meanwhile is seen at the next look, and
    its memory still goes back once it is over."""
    looks = []
    monkeypatch.setattr(server, "_resident_bytes", lambda: looks.append(1) or libc.resident)
    monkeypatch.setattr(server, "TRIM_BUSY_SECONDS", 10)  # (a busy trim, long after the last one, aside)
    busy = [False]
    task = asyncio.create_task(server._trim_forever(lambda: busy[0]))
    await asyncio.sleep(1.0)
    assert 4 <= len(looks) <= 12  # every 0.01 s it would be 100; backed off to every 0.16 s
    busy[0], libc.resident = True, 300 * MB  # a burst
    await asyncio.sleep(0.3)
    assert libc.trims == 0
    looks.clear()
    busy[0] = False
    await asyncio.sleep(0.3)
    assert libc.trims == 1 and libc.resident == 62 * MB
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_an_operators_own_malloc_settings_are_kept(libc, monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    server.tune_malloc()
    assert (server.M_ARENA_MAX, 2) in libc.mallopts
    libc.mallopts.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    server.tune_malloc()
    assert libc.mallopts == []
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    server.tune_malloc()
    assert libc.mallopts == []
