"""The rules of a guarded download before anything connects: the policy (allowed hosts and networks,
size, time, redirects), the URL-level checks, and the errors. Pure: no I/O (safe_download.py does it)."""

from __future__ import annotations

import ipaddress
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field

from netguard.addresses import IPAddress, embedded_ipv4

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
        if isinstance(ip, ipaddress.IPv6Address) and (embedded := embedded_ipv4(ip)):
            candidates.append(embedded[0])
        return any(c.version == n.version and c in n for c in candidates for n in self._networks)


# ---- URL and redirect rules ---------------------------------------------------------------------


def shown_host(host: str) -> str:
    """The host as a message may show it: an invalid name is not echoed."""
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
        raise DownloadRefused(f"host {shown_host(host)} is not on the allowlist")
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
