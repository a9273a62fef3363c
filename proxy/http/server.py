"""The HTTP server under `serve`: aiohttp's, with bounds on slow clients, and the loopback check.

aiohttp bounds idle keep-alive connections (keepalive_timeout) but has no limit on how long a request
head may take to arrive, nor on a body that stops arriving. `GuardedRequestHandler` adds both to aiohttp's
RequestHandler (the asyncio protocol of one connection):

- header_timeout: from the moment the server waits for a request (the connection opened, or the first
  byte of the next request on a keep-alive connection) its whole head must arrive within this many
  seconds; otherwise the connection gets a 408 and is closed (a client trickling a head byte by byte).
- body_timeout: while a handler runs and the request body is not complete, a client that sends nothing for
  this many seconds has the body end with an error (the proxy answers 400) and the connection closed.
  Time when the server itself stopped reading (flow control: the handler is not consuming) does not count.
- keepalive_timeout: aiohttp's own: an idle keep-alive connection is closed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from .collector import collect_forever, tune_gc
from .wire_errors import client_error, describe, error_response

log = logging.getLogger("proxy")

# The accept queue of each listening socket (the kernel caps it at net.core.somaxconn): a burst of
# thousands of clients connecting at once waits in it; past it, connections are dropped and each client
# retries a second or more later (10,000 at once on --workers 2 waited +19 s with 128).
LISTEN_BACKLOG = 4096

_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10
    body_timeout: float = 30
    keepalive_timeout: float = 15


class GuardedRequestHandler(RequestHandler):
    """aiohttp's RequestHandler with a deadline for each request head and a bound on a stalled body."""

    __slots__ = ("_limits", "_head_timer", "_head_count", "_body_timer", "_body", "_last_read")

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = 0
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the payload of the request being received
        self._last_read = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        self._last_read = self._loop.time()
        if self._request_count != parsed:  # a head arrived (or a malformed one, which aiohttp answers 400)
            self._stop_head_timer()
            message, payload = self._messages[-1] if self._messages else (None, None)
            if isinstance(message, _ErrInfo):
                self._body_broke(message.exc)
            elif payload is not None and not payload.is_eof():
                self._watch_body(payload)
        elif data and self._head_timer is None and self._waiting_for_request():
            self._start_head_timer()  # the first bytes of the next request on a keep-alive connection

    def _waiting_for_request(self) -> bool:
        return self._waiter is not None and not self._waiter.done() and not self._request_in_progress

    # ---- the request head -------------------------------------------------------------------------

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_count = self._request_count
        self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._request_count != self._head_count or self._request_in_progress:
            return
        log.debug("closing a connection from %s: no complete request head within %g s",
                  self.peername, self._limits.header_timeout)
        with contextlib.suppress(Exception):
            self.transport.write(_TIMEOUT_408)
        self.force_close()

    # ---- the request body -------------------------------------------------------------------------

    def _watch_body(self, payload: StreamReader) -> None:
        self._body = payload
        if self._body_timer is None:
            self._body_timer = self._loop.call_later(self._limits.body_timeout, self._check_body)

    def _body_broke(self, exc: BaseException | None) -> None:
        """The parser failed in the middle of a body (bad chunked encoding): aiohttp queues a 400 for after
        the handler, and the handler's read would wait for data the parser no longer passes on, until
        body_timeout. Its read fails now instead (the proxy answers 400), in words without the bytes;
        a body nobody reads any more just ends (aiohttp's drain of it would log the error at ERROR)."""
        payload, self._body = self._body, None
        if payload is None or payload.is_eof():
            return
        request = self._current_request
        if request is not None and request.content is payload:
            payload.set_exception(RequestPayloadError(f"{describe(exc)} in the request body"))
        else:  # answered already, aiohttp is draining the unread rest: there is none
            payload.feed_eof()

    def _check_body(self) -> None:
        self._body_timer = None
        payload = self._body
        if payload is None or payload.is_eof() or self.transport is None:
            self._body = None
            return
        now = self._loop.time()
        if self._reading_paused or self._buffer_paused:  # the server holds the body back, not the client
            self._last_read = now
        quiet = now - self._last_read
        request = self._current_request
        reading = request is not None and request.content is payload
        if quiet < self._limits.body_timeout or (not reading and self._request_in_progress):
            # Still arriving, or queued behind another request that is being handled: look again.
            wait = max(self._limits.body_timeout - quiet, 0.05)
            self._body_timer = self._loop.call_later(wait, self._check_body)
            return
        log.info("request body from %s stalled: nothing for %.1f s; ending it", self.peername, quiet)
        self._body = None
        self.close()  # read nothing more from this connection, and close it once the handler answers
        if reading:  # the handler's read fails (the proxy answers 400)
            payload.set_exception(RequestPayloadError(
                f"the request body stalled: no data for {self._limits.body_timeout:g} s"))
        # Nothing left to wait for: neither the handler nor aiohttp's draining of an unread body after the
        # answer (up to 10 s) waits on the rest.
        payload.feed_eof()

    # ---- what aiohttp answers itself ------------------------------------------------------------------

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused (400) or whose handler raised past every
        middleware (500, 504), in OpenAI's shape rather than text quoting the client's bytes; a malformed
        request is logged at DEBUG without them (see proxy/http/wire_errors.py)."""
        if client_error(exc) or status == 400:
            log.debug("malformed request from %s: %s", request.remote, describe(exc))
        elif status == 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:  # the answer has begun: nothing more can be sent
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        response = error_response(status, exc).to_response()
        response.force_close()
        return response


class GuardedServer(web.Server):
    """web.Server whose connections are GuardedRequestHandlers."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """web.AppRunner serving through GuardedServer: the app's startup, shutdown and cleanup as usual."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app and builds aiohttp's own Server
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                             limits=self.limits, **plain._kwargs)


# ---- memory: give freed image buffers back ------------------------------------------------------------

M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD = -8, -3, -1  # glibc's mallopt parameters
TRIM_CHECK_SECONDS = 0.1
TRIM_QUIET_SECONDS = 2.0  # idle with nothing to give back: the looks slow down to this (not 10 wake-ups a second)
TRIM_GROWTH_BYTES = 8 * 1024 * 1024  # resident memory this much over the least a trim left: give back...
TRIM_IDLE_SECONDS = 1.0  # ...when no image request is being worked on, at most this often
TRIM_BUSY_SECONDS = 30.0  # ...and under load that never pauses, this often


def _glibc() -> ctypes.CDLL | None:

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def tune_malloc() -> None:
    """glibc's malloc for a process that handles multi-megabyte buffers (a 1024x1024 image is ~4 MB of
    base64): at most two arenas; blocks up to 32 MB on the heap rather than each mapped on its own (a
    fresh mapping costs its page faults every time: that doubled the CPU per 1024x1024 request on a VM);
    and no giving back of the heap's top at each free (the same faults again on the next request).
    Setting these fixes glibc's sliding thresholds. `_trim_forever` gives freed memory back instead,
    once a burst is over. An operator's own glibc settings (MALLOC_* or GLIBC_TUNABLES in the
    environment) are left as they are."""
    if any(name.startswith("MALLOC_") for name in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 2)
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's largest
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024)


def raise_open_files_limit() -> tuple[int, int] | None:
    """Lift the soft limit on open files to the hard one: each request in flight holds two sockets (the
    client's and the upstream's), and a service manager's usual soft limit (1024) is reached at a few
    hundred slow generations at once, where accepting fails. An operator's lower hard limit still holds.
    Returns the soft limit before and after (None where there is no such limit: Windows)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def log_open_files_limit(before: int, after: int) -> None:
    """Say what the open files limit allows: about half of it in requests at once."""
    if after == before:
        log.info("open files: limit %d (about %d requests in flight at most)", after, after // 2)
    else:
        log.info("open files: limit raised from %d to %d (about %d requests in flight at most)",
                 before, after, after // 2)
    if after < 4096:
        log.warning("open files: the hard limit (%d) allows only about %d requests in flight; raise it "
                    "(ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) for more", after, after // 2)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def _trim_forever(busy: Callable[[], bool]) -> None:
    """malloc_trim(0) when resident memory has grown TRIM_GROWTH_BYTES over the least a trim left and no
    image request is being worked on (`busy()` is false): the freed buffers of a burst go back to the
    system within a second or two of its end. Not while requests run (under a load that never pauses,
    every TRIM_BUSY_SECONDS): their next buffers would fault the same pages in again. An idle server with
    nothing to give back looks less and less often, down to every TRIM_QUIET_SECONDS."""
    libc = _glibc()
    floor = _resident_bytes()
    if libc is None or floor is None:
        return
    loop = asyncio.get_running_loop()
    trimmed_at = loop.time()
    interval = TRIM_CHECK_SECONDS
    while True:
        await asyncio.sleep(interval)
        waited = loop.time() - trimmed_at
        resident = _resident_bytes()
        if resident is None:  # /proc unreadable now: try again on the next round
            continue
        grown, working = resident - floor > TRIM_GROWTH_BYTES, busy()
        if grown and waited >= (TRIM_BUSY_SECONDS if working else TRIM_IDLE_SECONDS):
            await asyncio.to_thread(libc.malloc_trim, 0)
            trimmed_at, floor = loop.time(), min(floor, _resident_bytes() or floor)
        interval = TRIM_CHECK_SECONDS if grown or working else min(interval * 2, TRIM_QUIET_SECONDS)


async def _serve(app: web.Application, sockets: list[socket.socket], limits: ConnectionLimits, *,
                 shutdown_timeout: float, on_ready: Callable[[], None], busy: Callable[[], bool]) -> None:
    # handler_cancellation: a client that hangs up cancels its request, and with it a local GPU job.
    # access_log=None: the gateway logs one line per image request and passthrough call (proxy.requests); aiohttp's
    # access log doubled that and logged every probe, 18 % of the loop's time at c=16.
    runner = GuardedAppRunner(app, limits, handle_signals=True, shutdown_timeout=shutdown_timeout, access_log=None,
                              handler_cancellation=True)
    await runner.setup()
    collector = asyncio.ensure_future(collect_forever(busy)) if tune_gc() else None
    try:
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        on_ready()
        await _trim_forever(busy)  # until SIGINT / SIGTERM (GracefulExit) or cancellation
        await asyncio.Event().wait()  # (without glibc there is nothing to trim)
    finally:
        if collector is not None:
            collector.cancel()
        await runner.cleanup()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (a dependency, except on Windows), else asyncio's.

    Measured with bench/bench_gateway.py on 2 cores: 5-20 % less CPU per small request; no change on
    megabyte answers."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(app: web.Application, sockets: list[socket.socket], limits: ConnectionLimits, *,
        shutdown_timeout: float, on_ready: Callable[[], None], busy: Callable[[], bool] = lambda: False) -> None:
    """web.run_app for already-bound sockets, with the slow-client bounds; returns after SIGINT/SIGTERM.
    `busy`: whether requests are being worked on (freed memory is given back when not)."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(app, sockets, limits, shutdown_timeout=shutdown_timeout,
                                   on_ready=on_ready, busy=busy))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            for tasks in ({main}, asyncio.all_tasks(loop)):
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


# ---- the loopback check -------------------------------------------------------------------------


def _loopback_address(text: str) -> bool:
    addr = ipaddress.ip_address(text.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def all_loopback(sockets: list[socket.socket]) -> bool:
    """Whether every socket is bound to a loopback address (127.0.0.0/8 or ::1; "localhost" resolves to
    them); a socket on every interface (0.0.0.0, ::) or on any other address is not."""
    return all(_loopback_address(str(sock.getsockname()[0])) for sock in sockets)
