"""The one guarded fetcher for URLs the proxy did not choose (upstream image URLs, LoRA URLs, edit images).

A URL that arrives in data (an upstream's answer, a client's request) may point anywhere: at the
cloud metadata service, at a database on the loopback interface, at the office network. Every such
URL goes through `GuardedFetcher.fetch(url, policy)`, which

- accepts https only (http when the policy allows it), no user:password@, no data:/file:/ftp:;
- takes only host names DNS can hold (labels of 1 to 63 characters, 253 in all);
- takes only hosts on the policy's allowlist, when it has one (Unicode entries compared as punycode);
- resolves the host name once and refuses it when ANY of its addresses is not a public one
  (loopback, private, link-local, CGNAT, multicast, reserved, ... and the IPv6 forms that embed
  such an IPv4 address), unless the policy allows private addresses or names the network;
- connects to exactly the addresses it checked: the connector's resolver answers only with them,
  so a DNS server that changes its answer between check and connect gains nothing;
- follows redirects itself, checking every hop by the same rules;
- caps the size (Content-Length and while streaming) and the total time.

Refusals raise `FetchRefused` naming the rule; network trouble, HTTP status, size and time raise
`FetchFailed`. Neither message carries anything the target sent.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from netguard.addresses import (
    IPAddress,
    IPNetwork,
    address_refusal,
    embedded_ipv4,
    host_name_problem,
    idna_host,
    parse_numeric_host,
)

__all__ = ["FetchError", "FetchFailed", "FetchPolicy", "FetchRefused", "GuardedFetcher", "address_refusal",
           "parse_numeric_host"]

# host -> addresses; sync or async.
HostResolver = Callable[[str], Iterable[str] | Awaitable[Iterable[str]]]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Threads for the fetcher's own name lookups (see GuardedFetcher._lookups).
LOOKUP_THREADS = 16


class FetchError(Exception):
    """Base of the fetcher's errors."""


class FetchRefused(FetchError):
    """The URL breaks a rule of the policy; nothing was sent to it."""


class FetchFailed(FetchError):
    """The fetch was allowed but did not succeed: network, HTTP status, size cap or time."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FetchPolicy:
    # Exact host names, or "*.example.com" for any name below example.com; empty = any public host.
    allowed_hosts: frozenset[str] = frozenset()
    allow_http: bool = False
    # Tests and on-prem setups: loopback, private and other non-public addresses are let through.
    allow_private: bool = False
    # CIDRs allowed even when not public, e.g. ("10.1.0.0/16",).
    allowed_networks: tuple[str, ...] = ()
    max_bytes: int = 64 * 1024 * 1024
    timeout: float = 60.0
    max_redirects: int = 3
    _networks: tuple[IPNetwork, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosts = [self.allowed_hosts] if isinstance(self.allowed_hosts, str) else self.allowed_hosts
        # URLs carry punycode: an entry written in Unicode must be compared in that form.
        object.__setattr__(self, "allowed_hosts", frozenset(idna_host(h) for h in hosts))
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        # A bad CIDR is a configuration error: raise ValueError now, not on the first fetch.
        object.__setattr__(self, "_networks",
                           tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks))

    def host_allowed(self, host: str) -> bool:
        if not self.allowed_hosts:
            return True
        for entry in self.allowed_hosts:
            if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
                return True
        return False

    def address_allowed(self, ip: IPAddress) -> bool:
        """Whether a non-public address is let through by this policy."""
        if self.allow_private:
            return True
        candidates = [ip]
        embedded = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
        if embedded:
            candidates.append(embedded[0])
        return any(c.version == n.version and c in n for c in candidates for n in self._networks)


# ---- the resolver the connector uses --------------------------------------------------------------

# host -> the addresses checked for it, for the fetch running in this task.
_PINNED: contextvars.ContextVar[dict[str, list[IPAddress]] | None] = contextvars.ContextVar(
    "qip_fetch_pinned", default=None)


class _PinnedResolver(AbstractResolver):
    """Answers only with addresses the fetch already checked; any other name fails to resolve."""

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_UNSPEC) -> list[ResolveResult]:
        pinned = (_PINNED.get() or {}).get(host.rstrip(".").lower())
        if not pinned:
            raise OSError(f"host {host} was not checked by the fetcher")
        results: list[ResolveResult] = []
        for ip in pinned:
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            if family in (socket.AF_UNSPEC, fam):
                results.append({"hostname": host, "host": str(ip), "port": port, "family": fam,
                                "proto": 0, "flags": socket.AI_NUMERICHOST})
        if not results:
            raise OSError(f"host {host} has no checked address of the requested family")
        return results

    async def close(self) -> None:
        pass


# ---- the fetcher --------------------------------------------------------------------------------


class GuardedFetcher:
    """Fetches URLs by a FetchPolicy. One per process; `close()` it on shutdown.

    `resolver`: how host names become addresses: an aiohttp AbstractResolver, or a callable
    host -> addresses (sync or async). Default: the event loop's getaddrinfo.
    """

    def __init__(self, resolver: AbstractResolver | HostResolver | None = None,
                 trace_configs: list | None = None) -> None:
        self.resolver = resolver
        self.trace_configs = trace_configs  # client spans for the downloads, when the gateway traces
        self._session: aiohttp.ClientSession | None = None
        # getaddrinfo blocks a thread until the DNS server answers, and the names come from clients and
        # upstreams: a zone that answers late would hold the loop's default executor, where images are
        # decoded and encoded, and stall every request. Lookups wait on threads of their own instead.
        self._lookups: ThreadPoolExecutor | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=_PinnedResolver(),
                # Each fetch resolves and checks for itself: no DNS cache, and no connection kept
                # for a later fetch whose policy (or whose answer for the same name) may differ.
                use_dns_cache=False,
                force_close=True,
                limit=0,  # no cap of 100 at once: past it, slow downloads would queue on their own timeouts
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,  # an environment proxy would connect for us, past the checks
                timeout=aiohttp.ClientTimeout(total=None),
                trace_configs=self.trace_configs,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)  # a lookup still waiting is not waited for
            self._lookups = None

    async def fetch(self, url: str, policy: FetchPolicy) -> bytes:
        """The body of `url` after following allowed redirects, or FetchRefused / FetchFailed."""
        try:
            async with asyncio.timeout(policy.timeout):
                return await self._fetch(url, policy)
        except TimeoutError:
            raise FetchFailed(f"the download did not finish within {policy.timeout:g} s") from None

    async def post(self, url: str, policy: FetchPolicy, body: bytes, headers: dict[str, str]) -> int:
        """POST `body` to `url` by the same rules (a webhook): the answer's HTTP status, after reading at
        most policy.max_bytes of its body (the rest is dropped with the connection). Redirects are not
        followed: a 3xx is the answer. FetchRefused / FetchFailed (network trouble or time) as fetch()."""
        try:
            async with asyncio.timeout(policy.timeout):
                current = self.parse(url)
                host = self.check(current, policy)
                addresses = await self.vet_addresses(host, current, policy)
                token = _PINNED.set({host: addresses})
                try:
                    async with self._http().post(current, data=body, headers=headers, allow_redirects=False) as resp:
                        left = policy.max_bytes
                        async for chunk in resp.content.iter_chunked(1 << 16):
                            left -= len(chunk)
                            if left <= 0:
                                break
                        return resp.status
                finally:
                    _PINNED.reset(token)
        except TimeoutError:
            raise FetchFailed(f"no answer within {policy.timeout:g} s") from None
        except (aiohttp.ClientError, UnicodeError) as e:  # UnicodeError: see _get
            raise FetchFailed(f"sending to {host} failed ({e.__class__.__name__})") from None

    async def _fetch(self, url: str, policy: FetchPolicy) -> bytes:
        current = self.parse(url)
        for hop in range(policy.max_redirects + 1):
            host = self.check(current, policy)
            addresses = await self.vet_addresses(host, current, policy)
            token = _PINNED.set({host: addresses})
            try:
                result = await self._get(current, policy)
            finally:
                _PINNED.reset(token)
            if isinstance(result, bytes):
                return result
            if hop == policy.max_redirects:
                break
            current = current.join(result)
        raise FetchFailed(f"more than {policy.max_redirects} redirects")

    @staticmethod
    def parse(url: str) -> URL:
        if url[:5].lower() == "data:":
            raise FetchRefused("data: URLs are handled by the caller")
        try:
            return URL(url)
        except (ValueError, TypeError) as e:
            raise FetchRefused(f"the URL is malformed ({e.__class__.__name__})") from None

    @staticmethod
    def check(url: URL, policy: FetchPolicy) -> str:
        """The URL-level rules; returns the host name to resolve (lower case, no trailing dot)."""
        scheme = url.scheme.lower()
        if scheme == "data":
            raise FetchRefused("data: URLs are handled by the caller")
        if scheme not in ("https", "http") or (scheme == "http" and not policy.allow_http):
            raise FetchRefused(f"scheme {scheme or '(none)'} is not allowed")
        if url.raw_user is not None or url.raw_password is not None:
            raise FetchRefused("URLs with user information (user:password@) are not allowed")
        if url.explicit_port == 0:  # nothing listens on port 0: a webhook there was retried for a day
            raise FetchRefused("port 0 is not a port to send to")
        raw_host = url.raw_host
        if not raw_host:
            raise FetchRefused("the URL has no host")
        host = raw_host.lower().rstrip(".")
        if not host or "%" in host:
            raise FetchRefused(f"host {raw_host[:100]} is not a valid host name")
        # An IPv6 literal skips the DNS-name rules, but not the length: messages show the host.
        problem = host_name_problem(host) if ":" not in host else ("is longer than 253 characters"
                                                                   if len(host) > 253 else None)
        if problem:
            raise FetchRefused(f"host {host[:100]} is not a valid host name: it {problem}")
        if not policy.host_allowed(host):
            raise FetchRefused(f"host {host} is not on the allowlist")
        return host

    async def vet_addresses(self, host: str, url: URL, policy: FetchPolicy) -> list[IPAddress]:
        """Resolve once; every address must pass, else the fetch is refused."""
        literal = _literal_address(host)
        if literal is not None:
            addresses = [literal]
        elif host == "localhost" or host.endswith(".localhost"):
            addresses = [ipaddress.ip_address("127.0.0.1")]  # RFC 6761: loopback, whatever DNS says
        else:
            addresses = await self._resolve(host, url.port or 0)
        for ip in addresses:
            why = address_refusal(ip)
            if why and not policy.address_allowed(ip):
                shown = f"address {ip}" if literal is not None and str(ip) == host else f"host {host} resolves to {ip}, which"
                raise FetchRefused(f"{shown} is {why}")
        if literal is not None and str(literal) != host and ":" not in host:
            # 0x7f000001, 127.1, 0177.0.0.1, ...: aiohttp would refuse to connect to these anyway.
            raise FetchRefused(f"host {host} is a non-canonical form of the address {literal}")
        return addresses

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            if self.resolver is None:
                if self._lookups is None:
                    self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="qip-fetch-dns")
                infos = await asyncio.get_running_loop().run_in_executor(
                    self._lookups, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
                raw = [info[4][0] for info in infos]
            elif isinstance(self.resolver, AbstractResolver):
                raw = [r["host"] for r in await self.resolver.resolve(host, port, socket.AF_UNSPEC)]
            else:
                answer = self.resolver(host)
                if inspect.isawaitable(answer):
                    answer = await answer
                raw = list(answer)
        except (OSError, UnicodeError) as e:
            raise FetchFailed(f"host {host} could not be resolved ({e.__class__.__name__})") from None
        addresses: list[IPAddress] = []
        for item in raw:
            try:
                ip = ipaddress.ip_address(item)
            except ValueError:
                raise FetchFailed(f"host {host} resolved to something that is not an address") from None
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise FetchFailed(f"host {host} has no address")
        return addresses

    async def _get(self, url: URL, policy: FetchPolicy) -> bytes | URL:
        """One hop: the body on 200, the Location of a redirect, else FetchFailed.

        Messages name url.raw_host: url.host decodes punycode and raises UnicodeError on a broken label.
        So may a trace hook that reads url.host (the gateway's client spans): that is a failed fetch too,
        not an error no caller expects (a 500, a webhook delivery that never records its attempt).
        """
        try:
            async with self._http().get(url, allow_redirects=False,
                                        headers={"Accept-Encoding": "identity"}) as resp:
                if resp.status in REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise FetchFailed(f"HTTP {resp.status} without a Location", status=resp.status)
                    try:
                        return URL(location)
                    except ValueError:
                        raise FetchRefused("the redirect's Location is not a valid URL") from None
                if resp.status != 200:
                    raise FetchFailed(f"HTTP {resp.status} from {url.raw_host}", status=resp.status)
                if resp.content_length is not None and resp.content_length > policy.max_bytes:
                    raise FetchFailed(f"the body is larger than the {policy.max_bytes} byte limit")
                chunks, total = [], 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    total += len(chunk)
                    if total > policy.max_bytes:
                        raise FetchFailed(f"the body is larger than the {policy.max_bytes} byte limit")
                    chunks.append(chunk)
                return b"".join(chunks)
        except (aiohttp.ClientError, UnicodeError) as e:
            raise FetchFailed(f"fetching from {url.raw_host} failed ({e.__class__.__name__})") from None


def _literal_address(host: str) -> IPAddress | None:
    """The address a host names literally (IPv6, dotted quad or another inet_aton form), else None."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise FetchRefused(f"host {host} is not a valid IPv6 address") from None
    try:
        return parse_numeric_host(host)
    except ValueError:
        raise FetchRefused(f"host {host} is numeric but not a valid IPv4 address") from None
