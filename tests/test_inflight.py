"""proxy.routing.inflight: routing stopped when the client hangs up, drained with a clear error at shutdown, and
nothing kept once a request is done."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.errors import ShuttingDown
from proxy.routing import inflight
from proxy.routing.inflight import InFlight


class Transport:
    """The one thing the watcher asks of a connection."""

    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return default


@pytest.fixture(autouse=True)
def fast_watch(monkeypatch):
    monkeypatch.setattr(inflight, "DISCONNECT_POLL_SECONDS", 0.05)


def request(transport: Transport):
    return make_mocked_request("POST", "/v1/images/generations", transport=transport)


async def test_a_finished_request_leaves_nothing_behind():
    flights = InFlight()
    req = request(Transport())

    async def work():
        return "images"

    assert await flights.run(req, work()) == "images"
    assert not flights and len(flights) == 0
    ref = weakref.ref(req)
    del req
    gc.collect()
    assert ref() is None  # the table held on to no request (nor its answer)
    flights.close()


async def test_a_client_that_hangs_up_stops_its_routing():
    flights, transport = InFlight(), Transport()
    stopped = asyncio.Event()

    async def work():
        try:
            await asyncio.sleep(30)
        finally:
            stopped.set()

    task = asyncio.ensure_future(flights.run(request(transport), work()))
    await asyncio.sleep(0.12)
    assert not task.done() and len(flights) == 1  # a client still there is left alone
    t0 = time.monotonic()
    transport.closing = True
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stopped.is_set() and time.monotonic() - t0 < 10  # the work sleeps 30 s
    assert not flights
    flights.close()


async def test_other_requests_go_on_when_one_client_leaves():
    flights = InFlight()
    gone, staying = Transport(), Transport()

    async def work(seconds):
        await asyncio.sleep(seconds)
        return seconds

    left = asyncio.ensure_future(flights.run(request(gone), work(30)))
    kept = asyncio.ensure_future(flights.run(request(staying), work(0.3)))
    await asyncio.sleep(0.01)
    gone.closing = True
    assert await kept == 0.3
    with pytest.raises(asyncio.CancelledError):
        await left
    flights.close()


async def test_drain_waits_then_ends_the_rest_with_shutting_down():
    flights = InFlight()

    async def work(seconds):
        await asyncio.sleep(seconds)
        return "done"

    quick = asyncio.ensure_future(flights.run(request(Transport()), work(0.1)))
    slow = asyncio.ensure_future(flights.run(request(Transport()), work(30)))
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    await flights.drain(grace=0.4)
    assert 0.35 < time.monotonic() - t0 < 10  # the slow work sleeps 30 s
    assert await quick == "done"
    with pytest.raises(ShuttingDown) as e:
        await slow
    assert e.value.status == 503 and e.value.retry_after == 1
    assert not flights
    flights.close()


async def test_the_watcher_stops_when_idle_and_starts_again():
    # An idle server does not wake twice a second for nothing; the next request is watched again.
    flights = InFlight()

    async def work(seconds):
        await asyncio.sleep(seconds)

    await flights.run(request(Transport()), work(0.01))
    watcher = flights._watcher
    assert watcher is not None and not watcher.done()
    await asyncio.sleep(inflight.DISCONNECT_POLL_SECONDS * (inflight.IDLE_LOOKS + 2))
    assert watcher.done()
    transport = Transport()
    task = asyncio.ensure_future(flights.run(request(transport), work(30)))
    await asyncio.sleep(0.01)
    assert flights._watcher is not watcher and not flights._watcher.done()
    transport.closing = True
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    flights.close()


async def test_drain_with_nothing_in_flight_returns_at_once():
    flights = InFlight()
    t0 = time.monotonic()
    await flights.drain(grace=60)
    assert time.monotonic() - t0 < 10
