"""Guarded https downloads for URLs that arrive with a request (LoRA files).

A URL from a client may lead anywhere: to the cloud metadata service, to a database on the loopback
interface, to the office network, directly or through a redirect from an allowed host. `download`

- takes https URLs only, without user:password@, on a host of the allowlist ("name" or "*.domain");
- follows redirects itself (at most `max_redirects`) and checks every hop by the same rules;
- resolves each host once and refuses it when ANY address is not a public one (loopback, private,
  link-local, CGNAT, multicast, reserved, ... and the IPv6 forms that embed such an IPv4 address:
  IPv4-mapped, NAT64, 6to4, ...), then connects to exactly those addresses, with the host name for
  TLS (SNI and certificate check) and the Host header: a DNS answer that changes between check and
  connect gains nothing;
- ignores proxy settings from the environment (a proxy would connect past the checks);
- caps the size (Content-Length and while streaming) and the total time (a watchdog closes the
  connection at the deadline, so a server that sends a byte a minute cannot hold it open).

Refusals raise `DownloadRefused` naming the rule; network trouble, HTTP status, size and time raise
`DownloadFailed`. Neither message carries a URL's path or query, or anything the server sent.
Which addresses are public is netguard's rule (the proxy's fetcher follows the same one); the policy
and the URL checks are in download_policy.py; local_backend imports nothing from the proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.message import Message as HTTPMessage
from typing import IO, Any

from netguard.addresses import IPAddress, address_refusal

from .download_policy import (
    DownloadError,
    DownloadFailed,
    DownloadPolicy,
    DownloadRefused,
    check_url,
    next_hop,
    shown_host,
)

__all__ = [
    "DownloadError",
    "DownloadFailed",
    "DownloadPolicy",
    "DownloadRefused",
    "address_refusal",
    "check_url",
    "download",
    "next_hop",
    "resolve_host",
    "vet_addresses",
]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 1 << 20


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of a host name (getaddrinfo). Module level so tests can answer for it."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def vet_addresses(host: str, port: int, policy: DownloadPolicy) -> list[IPAddress]:
    """Resolve once; every address must pass, else DownloadRefused (nothing is connected to)."""
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            addresses = [ipaddress.ip_address("127.0.0.1")]  # RFC 6761, whatever DNS says
        else:
            try:
                raw = resolve_host(host, port)
            except (OSError, UnicodeError) as e:
                raise DownloadFailed(f"host {shown_host(host)} could not be resolved ({type(e).__name__})") from None
            addresses = []
            for item in raw:
                try:
                    addresses.append(ipaddress.ip_address(item))
                except ValueError:
                    raise DownloadRefused(f"host {shown_host(host)} resolves to something that is not an address") from None
    if not addresses:
        raise DownloadFailed(f"host {shown_host(host)} has no address")
    for ip in addresses:
        why = address_refusal(ip)
        if why and not policy.address_allowed(ip):
            raise DownloadRefused(f"host {shown_host(host)} resolves to {ip}, which is {why}")
    return addresses


# ---- the connection ------------------------------------------------------------------------------


class _Watchdog:
    """Closes every connection of a download at its deadline (blocking reads then fail at once)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.fired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.fired = True
            raise DownloadFailed("the download took too long")
        return left

    def watch(self, sock: socket.socket) -> None:
        # A duplicate of the descriptor: shutting it down stops the original's reads and writes,
        # and the number cannot be reused by another socket while this duplicate is open.
        dup = sock.dup()
        with self._lock:
            self._sockets.append(dup)
            fired = self.fired
        if fired:
            self._shutdown(dup)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            sockets = list(self._sockets)
        for s in sockets:
            self._shutdown(s)

    @staticmethod
    def _shutdown(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            s.close()


class _VettedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to the checked addresses of its host, with the host's name for TLS."""

    def __init__(self, *args: Any, policy: DownloadPolicy, watchdog: _Watchdog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._policy = policy
        self._watchdog = watchdog

    def connect(self) -> None:
        addresses = vet_addresses(self.host.rstrip("."), self.port, self._policy)
        error: OSError | None = None
        limit = self._watchdog.remaining()
        if isinstance(self.timeout, (int, float)):  # urllib passes the timeout download() gives open()
            limit = min(self.timeout, limit)
        for ip in addresses:
            try:
                sock = socket.create_connection((str(ip), self.port), limit)
                break
            except OSError as e:
                error = e
        else:
            raise error or OSError("no address to connect to")
        self._watchdog.watch(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # HTTPSConnection keeps its TLS context in _context, which typeshed leaves out (a private name).
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host.rstrip("."))  # type: ignore[attr-defined]


class _VettedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: DownloadPolicy, watchdog: _Watchdog) -> None:
        self._ssl = policy.ssl_context or ssl.create_default_context()
        super().__init__(context=self._ssl)
        self._policy, self._watchdog = policy, watchdog

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        def connection(host: str, **kwargs: Any) -> _VettedHTTPSConnection:
            return _VettedHTTPSConnection(host, policy=self._policy, watchdog=self._watchdog, **kwargs)

        return self.do_open(connection, req, context=self._ssl)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect comes back as an HTTPError: download() checks the hop and follows it itself.
    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: HTTPMessage, newurl: str) -> urllib.request.Request | None:
        return None


# ---- the download --------------------------------------------------------------------------------


def download(url: str, sink: Callable[[bytes], object], policy: DownloadPolicy) -> int:
    """Stream `url` into `sink` (called with each chunk); the number of bytes, or a DownloadError."""
    current = url
    check_url(current, policy)
    watchdog = _Watchdog(policy.timeout)
    try:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),  # no proxies from the environment: they skip the checks
            _NoRedirects(),
            _VettedHTTPSHandler(policy, watchdog),
        )
        for _ in range(policy.max_redirects + 1):
            try:
                response = opener.open(current, timeout=min(60.0, watchdog.remaining()))
            except urllib.error.HTTPError as e:
                with e:
                    if e.code not in REDIRECTS:
                        raise DownloadFailed(f"the server answered {e.code}") from None
                    current = next_hop(current, e.code, e.headers.get("Location"), policy)
                continue
            with response:
                return _stream(response, sink, policy, watchdog)
        raise DownloadFailed(f"more than {policy.max_redirects} redirects")
    except DownloadError as e:
        if watchdog.fired and isinstance(e, DownloadFailed):
            raise DownloadFailed(f"the download did not finish within {policy.timeout:g} s") from None
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if watchdog.fired:
            raise DownloadFailed(f"the download did not finish within {policy.timeout:g} s") from None
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, DownloadError):
            raise reason from None
        raise DownloadFailed(f"the download failed ({type(reason).__name__})") from None
    finally:
        watchdog.close()


def _stream(response: http.client.HTTPResponse, sink: Callable[[bytes], object], policy: DownloadPolicy, watchdog: _Watchdog) -> int:
    limit = policy.max_bytes
    declared = (response.headers.get("Content-Length") or "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise DownloadFailed(f"larger than {limit} bytes")
    size = 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise DownloadFailed(f"larger than {limit} bytes")
        watchdog.remaining()
        sink(chunk)
    return size
