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
This module is self-contained: local_backend imports nothing from the proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

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

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

REDIRECTS = frozenset({301, 302, 303, 307, 308})
CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_CHUNK = 1 << 20
# What a host name may look like in a message (anything else is not echoed).
_HOST_NAME = re.compile(r"^[a-z0-9._-]{1,253}$")


class DownloadError(Exception):
    """Base of the downloader's errors. Messages are safe to show to a client."""


class DownloadRefused(DownloadError):
    """The URL (or a redirect) breaks a rule; nothing was sent to that address."""


class DownloadFailed(DownloadError):
    """The download was allowed but did not succeed: network, HTTP status, size cap or time."""


@dataclass(frozen=True)
class DownloadPolicy:
    # Exact host names or "*.example.com" (any name below example.com); None = any host.
    allowed_hosts: frozenset[str] | None = frozenset()
    # Let loopback, private and other non-public addresses through (operator-configured URLs).
    allow_private: bool = False
    # Networks let through even when not public, e.g. ("10.1.0.0/16",).
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = 2 * 1024**3
    timeout: float = 600.0  # seconds for the whole download, redirects included
    max_redirects: int = 5
    ssl_context: ssl.SSLContext | None = None  # None = the system's trust store
    _networks: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.allowed_hosts is not None:
            hosts = frozenset(h.strip().lower().rstrip(".") for h in self.allowed_hosts)
            object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "_networks",
                           tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks))

    def host_allowed(self, host: str) -> bool:
        if self.allowed_hosts is None:
            return True
        return any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:]))
                   for entry in self.allowed_hosts)

    def address_allowed(self, ip: IPAddress) -> bool:
        """Whether a non-public address is let through anyway."""
        if self.allow_private:
            return True
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)):
            candidates.append(embedded[0])
        return any(c.version == n.version and c in n for c in candidates for n in self._networks)


# ---- address rules ------------------------------------------------------------------------------


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 form leads to, if it is one of those forms."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped, "IPv4-mapped"
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in NAT64:
        return low32, "NAT64"
    if ip in IPV4_TRANSLATED:
        return low32, "IPv4-translated"
    if ip.sixtofour:
        return ip.sixtofour, "6to4"
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d, the deprecated IPv4-compatible form
        return low32, "IPv4-compatible"
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """Why an address is not a public one ("loopback", ...), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped (zone id)"
        embedded = _embedded_ipv4(ip)
        if embedded:
            v4, form = embedded
            why = address_refusal(v4)
            return f"{why} ({form} {v4})" if why else None
        if ip in NAT64_LOCAL:
            return "local-use NAT64"
        if ip.is_site_local:
            return "site-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in CGNAT:
            return "shared address space (CGNAT)"
        if ip == ipaddress.IPv4Address("255.255.255.255"):
            return "broadcast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:  # documentation, benchmarking, Teredo, ...: the special-purpose registry
        return "not a public address"
    return None


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of a host name (getaddrinfo). Module level so tests can answer for it."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


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
                raise DownloadFailed(f"host {_shown(host)} could not be resolved ({type(e).__name__})") from None
            addresses = []
            for item in raw:
                try:
                    addresses.append(ipaddress.ip_address(item))
                except ValueError:
                    raise DownloadRefused(f"host {_shown(host)} resolves to something that is not an address") from None
    if not addresses:
        raise DownloadFailed(f"host {_shown(host)} has no address")
    for ip in addresses:
        why = address_refusal(ip)
        if why and not policy.address_allowed(ip):
            raise DownloadRefused(f"host {_shown(host)} resolves to {ip}, which is {why}")
    return addresses


# ---- URL and redirect rules ---------------------------------------------------------------------


def _shown(host: str) -> str:
    return host if _HOST_NAME.match(host) or _is_address(host) else "(an invalid host name)"


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_url(url: str, policy: DownloadPolicy) -> tuple[str, int]:
    """The URL-level rules: (host, port) to connect to, or DownloadRefused naming the rule."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 443
    except ValueError:
        raise DownloadRefused("the URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme != "https":
        raise DownloadRefused(f"only https URLs are allowed, not {scheme or '(no scheme)'}"
                              if len(scheme) <= 10 else "only https URLs are allowed")
    if parts.username is not None or parts.password is not None:
        raise DownloadRefused("URLs with user information (user:password@) are not allowed")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise DownloadRefused("the URL has no host")
    if "%" in host or any(c.isspace() for c in host):
        raise DownloadRefused("the URL's host is not a valid host name")
    if not policy.host_allowed(host):
        raise DownloadRefused(f"host {_shown(host)} is not on the allowlist")
    return host, port


def next_hop(current: str, status: int, location: str | None, policy: DownloadPolicy) -> str:
    """The URL a redirect leads to, once it passes the same rules as the first URL."""
    if not location:
        raise DownloadFailed(f"the server answered {status} without a Location")
    try:
        target = urllib.parse.urljoin(current, location.strip())
    except ValueError:
        raise DownloadRefused("a redirect went to a malformed URL") from None
    try:
        check_url(target, policy)
    except DownloadRefused as e:
        raise DownloadRefused(f"a redirect was refused: {e}") from None
    return target


# ---- the connection ------------------------------------------------------------------------------


class _Watchdog:
    """Closes every connection of a download at its deadline (blocking reads then fail at once)."""

    def __init__(self, seconds: float):
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

    def __init__(self, *args, policy: DownloadPolicy, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self._policy = policy
        self._watchdog = watchdog

    def connect(self) -> None:
        addresses = vet_addresses(self.host.rstrip("."), self.port, self._policy)
        error: OSError | None = None
        for ip in addresses:
            try:
                sock = socket.create_connection((str(ip), self.port),
                                                min(self.timeout, self._watchdog.remaining()))
                break
            except OSError as e:
                error = e
        else:
            raise error or OSError("no address to connect to")
        self._watchdog.watch(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host.rstrip("."))


class _VettedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: DownloadPolicy, watchdog: _Watchdog):
        self._ssl = policy.ssl_context or ssl.create_default_context()
        super().__init__(context=self._ssl)
        self._policy, self._watchdog = policy, watchdog

    def https_open(self, req):
        def connection(host, **kwargs):
            return _VettedHTTPSConnection(host, policy=self._policy, watchdog=self._watchdog, **kwargs)

        return self.do_open(connection, req, context=self._ssl)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect comes back as an HTTPError: download() checks the hop and follows it itself.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
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


def _stream(response, sink: Callable[[bytes], object], policy: DownloadPolicy, watchdog: _Watchdog) -> int:
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
