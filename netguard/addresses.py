"""The address and host-name rules for fetching URLs nobody vetted: which addresses are public, how
inet_aton reads numeric hosts, which names DNS can hold. Pure functions, no I/O. The proxy's fetcher
(proxy.media.fetch) and the engine's LoRA downloads (local_backend.safe_download) both follow them."""

from __future__ import annotations

import ipaddress
import re

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
# One dotted part of a numeric host as inet_aton reads it: decimal, 0x hex or 0 octal.
_NUMERIC_PART = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)


# ---- address rules ------------------------------------------------------------------------------


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
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
    if int(ip) >> 32 == 0 and int(ip) > 1:  # ::a.b.c.d, deprecated IPv4-compatible (:: and ::1 excluded)
        return low32, "IPv4-compatible"
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """Why an address is not a public one ("loopback", ...), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped (zone id)"
        embedded = embedded_ipv4(ip)
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
    if not ip.is_global:
        # Documentation, benchmarking, Teredo, ...: the standard library's special-purpose registry.
        return "not a public address"
    return None


def parse_numeric_host(host: str) -> ipaddress.IPv4Address | None:
    """Read a numeric host the way inet_aton does ("2130706433", "0x7f.1", "0177.0.0.1", "127.1").

    None when the host is not numeric at all; ValueError when it is numeric but no address.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMERIC_PART.fullmatch(p) for p in parts):
        return None
    values = []
    for p in parts:
        if p[:2].lower() == "0x":
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p[0] == "0":
            values.append(int(p, 8))  # ValueError on 8 or 9, as inet_aton refuses them
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        raise ValueError(host)
    number = 0
    for v in head:
        number = number << 8 | v
    return ipaddress.IPv4Address(number << (8 * (4 - len(head))) | last)


# ---- host-name rules ----------------------------------------------------------------------------


def host_name_problem(host: str) -> str | None:
    """Why a (non-IPv6, ASCII) host name cannot be a DNS name, or None.

    Such a name never resolves, and the system resolver's IDNA step raises UnicodeError on it
    (an empty label, a label over 63 characters) instead of a lookup error.
    """
    if len(host) > 253:
        return "is longer than 253 characters"
    if any(not 0 < len(label) <= 63 for label in host.split(".")):
        return "has an empty label or one over 63 characters"
    return None


def idna_host(name: str) -> str:
    """A configured host name as URLs carry it: lower case, punycode ("bücher.example" ->
    "xn--bcher-kva.example"), no trailing dot; a "*." prefix is kept. A name that does not
    encode stays as written: it matches nothing, as before, rather than stopping startup."""
    name = name.strip().lower().rstrip(".")
    wildcard, bare = ("*.", name[2:]) if name.startswith("*.") else ("", name)
    if bare.isascii():
        return name
    try:
        return wildcard + (URL.build(scheme="https", host=bare).raw_host or bare)
    except (ValueError, TypeError):
        return name
