"""LoRA URL downloads: every hop https, on the allowlist and at public addresses; size and time caps.

The servers here are real (TLS with a throwaway self-signed certificate, and plain HTTP) on the
loopback interface. Names are answered by a stand-in for DNS (`safe_download.resolve_host`). To
reach them at all, the redirect tests let exactly 127.0.0.1 through (`allowed_networks`); every
refusal checked here comes from another rule, or from another address.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from local_backend import safe_download
from local_backend.config import EngineConfig, LoraSpec
from local_backend.errors import LoraError
from local_backend.loras import LoraManager
from local_backend.safe_download import (
    DownloadFailed,
    DownloadPolicy,
    DownloadRefused,
    address_refusal,
    download,
    next_hop,
    vet_addresses,
)

PAYLOAD = b"not really a safetensors file, but bytes to download " * 20
SECRET_PAGE = "internal page text that must never reach a client"
NAMES = {  # the stand-in DNS
    "loras.example": ["127.0.0.1"],
    "cdn.loras.example": ["127.0.0.1"],
    "evil.example": ["127.0.0.1"],
    "private.loras.example": ["10.1.2.3"],
    "metadata.loras.example": ["169.254.169.254"],
    "internal.loras.example": ["127.0.0.2"],
    "mixed.loras.example": ["93.184.216.34", "192.168.1.1"],
}
HOSTS = frozenset({"loras.example", "*.loras.example"})


# ---- servers ------------------------------------------------------------------------------------


class Server:
    """A threaded HTTP(S) server that records every connection and every request (Host, path)."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.hits: list[tuple[str, str]] = []
        self.connections = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.hits.append((self.headers.get("Host", ""), self.path))
                path, _, query = self.path.partition("?")
                q = dict(urllib.parse.parse_qsl(query))
                if path == "/lora":
                    self.reply(200, PAYLOAD)
                elif path == "/redirect":
                    self.reply(int(q.get("status", "302")), b"", {"Location": q["to"]})
                elif path == "/loop":
                    self.reply(302, b"", {"Location": "/loop"})
                elif path == "/big":
                    self.reply(200, b"x" * 5000)
                elif path == "/big-unsized":  # no Content-Length: the body ends when the connection does
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(b"y" * 5000)
                    self.close_connection = True
                elif path == "/drip":  # one byte at a time, for ever (until the client hangs up)
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"z")
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:
                        pass
                    self.close_connection = True
                else:
                    self.reply(404, SECRET_PAGE.encode())

            def reply(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class HTTPServer(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                request = super().get_request()
                outer.connections += 1
                return request

        self.httpd = HTTPServer((host, 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    names = ",".join(f"DNS:{n}" for n in NAMES)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "2",
         "-subj", "/CN=loras.example", "-addext", f"subjectAltName={names}"],
        check=True, capture_output=True,
    )
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def client_tls(cert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert[0]))


def _server_tls(cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


@pytest.fixture
def tls_server(cert):
    server = Server(tls=_server_tls(cert))
    yield server
    server.close()


@pytest.fixture
def http_server():
    server = Server()
    yield server
    server.close()


@pytest.fixture
def internal_server(cert):
    """A TLS server on 127.0.0.2: loopback, but not the one address the tests let through."""
    try:
        server = Server(host="127.0.0.2", tls=_server_tls(cert))
    except OSError:
        pytest.skip("cannot listen on 127.0.0.2 here")
    yield server
    server.close()


@pytest.fixture
def dns(monkeypatch) -> list[str]:
    """The names asked for, in order; unknown names do not resolve."""
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if host not in NAMES:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        return list(NAMES[host])

    monkeypatch.setattr(safe_download, "resolve_host", resolve)
    return asked


@pytest.fixture
def connects(monkeypatch) -> list:
    """Every TCP connection the downloader opens."""
    opened: list = []
    real = socket.create_connection

    def create_connection(address, *args, **kwargs):
        opened.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(safe_download.socket, "create_connection", create_connection)
    return opened


def local_policy(client_tls, **overrides) -> DownloadPolicy:
    """The request rules, plus exactly 127.0.0.1 so the test servers can be reached."""
    options = {"allowed_hosts": HOSTS, "allowed_networks": ("127.0.0.1/32",), "ssl_context": client_tls,
               "max_bytes": 10_000}
    return DownloadPolicy(**{**options, **overrides})


def fetch(url: str, policy: DownloadPolicy) -> bytes:
    parts: list[bytes] = []
    download(url, parts.append, policy)
    return b"".join(parts)


# ---- (a) addresses: refused before any connection --------------------------------------------------

BAD_ADDRESSES = [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.0.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "192.0.2.1",
    "::1", "::", "fe80::1", "fc00::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1",  # NAT64 (and local-use NAT64)
    "2002:7f00:1::", "2002:a00:1::",  # 6to4 around 127.0.0.1 and 10.0.0.1
    "::127.0.0.1", "2001:db8::1",  # IPv4-compatible; documentation
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_a_request_url_whose_name_resolves_to_a_non_public_address_is_refused(
        address, monkeypatch, tmp_path, connects):
    monkeypatch.setattr(safe_download, "resolve_host", lambda host, port: [address])
    manager = LoraManager(EngineConfig(lora_url_hosts=["loras.example"], lora_cache_dir=str(tmp_path)))
    try:
        ref = manager.resolve(LoraSpec("https://loras.example/fox.safetensors?token=secret"), trusted=False)
        with pytest.raises(LoraError) as e:
            ref.source.result(timeout=30)
    finally:
        manager.close()
    message = str(e.value)
    assert e.value.param == "loras"
    assert "refused" in message and f"resolves to {ipaddress.ip_address(address)}" in message
    assert "secret" not in message and "token" not in message
    assert connects == []  # not even a TCP connection
    assert not list(tmp_path.glob("*.safetensors"))


def test_every_address_of_a_name_must_be_public(dns):
    policy = DownloadPolicy(allowed_hosts=HOSTS)
    with pytest.raises(DownloadRefused, match="192.168.1.1, which is private"):
        vet_addresses("mixed.loras.example", 443, policy)
    with pytest.raises(DownloadFailed, match="could not be resolved"):
        vet_addresses("unknown.loras.example", 443, policy)


def test_address_rules():
    for address in BAD_ADDRESSES:
        assert address_refusal(ipaddress.ip_address(address)), address
    for address in ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8",
                    "2002:808:808::"]:
        assert address_refusal(ipaddress.ip_address(address)) is None, address
    assert "IPv4-mapped" in address_refusal(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert "NAT64" in address_refusal(ipaddress.ip_address("64:ff9b::a9fe:a9fe"))
    assert "6to4" in address_refusal(ipaddress.ip_address("2002:7f00:1::"))
    assert "CGNAT" in address_refusal(ipaddress.ip_address("100.64.0.1"))


def test_literal_addresses_and_localhost_are_checked_without_dns(dns):
    policy = DownloadPolicy(allowed_hosts=None)  # any host: the address rules alone
    for host in ["127.0.0.1", "::1", "169.254.169.254", "localhost", "db.localhost"]:
        with pytest.raises(DownloadRefused):
            vet_addresses(host, 443, policy)
    assert dns == []


# ---- (b) redirects: every hop by the same rules -----------------------------------------------------


def test_an_allowed_download_with_an_allowed_redirect(tls_server, client_tls, dns, connects):
    port = tls_server.port
    to = f"https://cdn.loras.example:{port}/lora?sig=abc"
    url = f"https://loras.example:{port}/redirect?to={urllib.parse.quote(to)}"
    assert fetch(url, local_policy(client_tls)) == PAYLOAD
    # Connected to the checked address, with the name for the Host header (and for TLS: the
    # certificate was verified for that name).
    assert [host for host, _ in tls_server.hits] == [f"loras.example:{port}", f"cdn.loras.example:{port}"]
    assert dns == ["loras.example", "cdn.loras.example"]  # one answer per hop, used for the connection
    assert connects == [("127.0.0.1", port), ("127.0.0.1", port)]
    # A relative Location is joined to the current URL and checked like any other.
    assert fetch(f"https://loras.example:{port}/redirect?to=/lora", local_policy(client_tls)) == PAYLOAD


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_off_the_allowlist_is_refused_and_never_sent(tls_server, client_tls, dns, status):
    port = tls_server.port
    to = f"https://evil.example:{port}/lora?token=secret"
    url = f"https://loras.example:{port}/redirect?status={status}&to={urllib.parse.quote(to)}"
    with pytest.raises(DownloadRefused) as e:
        fetch(url, local_policy(client_tls))
    assert "redirect" in str(e.value) and "evil.example is not on the allowlist" in str(e.value)
    assert "secret" not in str(e.value)
    assert all(not host.startswith("evil.example") for host, _ in tls_server.hits)
    assert len(tls_server.hits) == 1 and "evil.example" not in dns


def test_a_redirect_to_http_is_refused_and_never_sent(tls_server, http_server, client_tls, dns):
    to = f"http://loras.example:{http_server.port}/lora"
    url = f"https://loras.example:{tls_server.port}/redirect?to={urllib.parse.quote(to)}"
    with pytest.raises(DownloadRefused, match="only https"):
        fetch(url, local_policy(client_tls))
    assert http_server.hits == [] and http_server.connections == 0


def test_a_redirect_to_an_allowed_name_at_a_loopback_address_is_refused(
        tls_server, internal_server, client_tls, dns, connects):
    # The allowlisted host redirects to another allowlisted name that resolves to 127.0.0.2, where
    # a server is listening: nothing reaches it.
    to = f"https://internal.loras.example:{internal_server.port}/lora"
    url = f"https://loras.example:{tls_server.port}/redirect?to={urllib.parse.quote(to)}"
    with pytest.raises(DownloadRefused, match="resolves to 127.0.0.2, which is loopback"):
        fetch(url, local_policy(client_tls))
    assert internal_server.connections == 0 and internal_server.hits == []
    assert connects == [("127.0.0.1", tls_server.port)]


@pytest.mark.parametrize("name, why", [("private", "private"), ("metadata", "link-local"), ("mixed", "private")])
def test_a_redirect_to_an_allowed_name_at_a_private_address_is_refused(tls_server, client_tls, dns, connects,
                                                                         name, why):
    to = f"https://{name}.loras.example/lora"
    url = f"https://loras.example:{tls_server.port}/redirect?to={urllib.parse.quote(to)}"
    with pytest.raises(DownloadRefused, match=f"which is {why}"):
        fetch(url, local_policy(client_tls))
    assert len(connects) == 1  # the first hop only


@pytest.mark.parametrize("location, rule", [
    ("http://loras.example/x", "only https"),
    ("HTTP://loras.example/x", "only https"),
    ("ftp://loras.example/x", "only https"),
    ("file:///etc/passwd", "only https"),
    ("javascript:alert(1)", "only https"),
    ("https://evil.example/x?token=secret", "not on the allowlist"),
    ("//evil.example/x", "not on the allowlist"),  # scheme-relative
    ("https://loras.example@evil.example/x", "user information"),
    ("https://user:pw@cdn.loras.example/x", "user information"),
    ("https://127.0.0.1/x", "not on the allowlist"),
    ("https://[::1]/x", "not on the allowlist"),
    ("https://loras.example.evil.example/x", "not on the allowlist"),
    ("https://cdn.loras.example:99999/x", "malformed"),
    ("https://[::1/x", "malformed"),
])
def test_next_hop_refuses_crafted_locations(location, rule):
    policy = DownloadPolicy(allowed_hosts=HOSTS)
    with pytest.raises(DownloadRefused, match=rule) as e:
        next_hop("https://loras.example/a/b", 302, location, policy)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize("location, expected", [
    ("/lora", "https://loras.example/lora"),
    ("c", "https://loras.example/a/c"),
    ("https://cdn.loras.example/x?sig=1", "https://cdn.loras.example/x?sig=1"),
    ("https://CDN.Loras.Example./x", "https://CDN.Loras.Example./x"),
    ("  https://loras.example/y ", "https://loras.example/y"),
    ("https:///x", "https://loras.example/x"),  # same scheme, no host: relative, as urljoin reads it
])
def test_next_hop_follows_allowed_locations(location, expected):
    policy = DownloadPolicy(allowed_hosts=HOSTS)
    assert next_hop("https://loras.example/a/b", 302, location, policy) == expected


def test_a_redirect_without_location_and_redirect_loops_fail(tls_server, client_tls, dns):
    with pytest.raises(DownloadFailed, match="without a Location"):
        next_hop("https://loras.example/", 302, None, DownloadPolicy(allowed_hosts=HOSTS))
    with pytest.raises(DownloadFailed, match="more than 2 redirects"):
        fetch(f"https://loras.example:{tls_server.port}/loop", local_policy(client_tls, max_redirects=2))
    assert len(tls_server.hits) == 3


def test_an_error_status_names_the_status_not_the_page(tls_server, client_tls, dns):
    with pytest.raises(DownloadFailed) as e:
        fetch(f"https://loras.example:{tls_server.port}/nothing-here", local_policy(client_tls))
    assert "404" in str(e.value) and SECRET_PAGE not in str(e.value)


def test_a_certificate_for_another_name_fails(tls_server, client_tls, monkeypatch):
    # The connection goes to the checked address, but TLS still checks the certificate for the name.
    monkeypatch.setattr(safe_download, "resolve_host", lambda host, port: ["127.0.0.1"])
    policy = local_policy(client_tls, allowed_hosts=frozenset({"other.example"}))
    with pytest.raises(DownloadFailed, match="SSLCertVerificationError"):
        fetch(f"https://other.example:{tls_server.port}/lora", policy)


# ---- (c) size and time caps ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
def test_the_size_cap(tls_server, client_tls, dns, path):
    written: list[bytes] = []
    with pytest.raises(DownloadFailed, match="larger than 1000 bytes"):
        download(f"https://loras.example:{tls_server.port}{path}", written.append,
                 local_policy(client_tls, max_bytes=1000))
    assert sum(map(len, written)) <= 1000
    assert fetch(f"https://loras.example:{tls_server.port}{path}", local_policy(client_tls, max_bytes=5000))


def test_the_total_time_cap_holds_against_a_slow_drip(tls_server, client_tls, dns):
    started = time.monotonic()
    with pytest.raises(DownloadFailed, match="did not finish within 0.8 s"):
        fetch(f"https://loras.example:{tls_server.port}/drip", local_policy(client_tls, timeout=0.8, max_bytes=10**6))
    assert time.monotonic() - started < 5  # each byte comes within the per-read timeout: only the total stops it


# ---- (d) through the LoRA manager: LoraError for the client ----------------------------------------


def test_the_manager_turns_refusals_into_lora_errors(tmp_path, monkeypatch, connects):
    config = EngineConfig(lora_url_hosts=["loras.example", "*.cdn.example"], lora_cache_dir=str(tmp_path))
    manager = LoraManager(config)
    try:
        # The first URL's rules apply at once, on the caller's thread.
        for url, rule in [("http://loras.example/x.safetensors?token=secret", "only https"),
                          ("https://evil.example/x.safetensors?token=secret", "not allowed"),
                          ("https://a:b@loras.example/x.safetensors?token=secret", "user information")]:
            with pytest.raises(LoraError, match=rule) as e:
                manager.resolve(LoraSpec(url), trusted=False)
            assert "secret" not in str(e.value) and e.value.param == "loras"
        # Wildcard entries: any name below the domain.
        monkeypatch.setattr(safe_download, "resolve_host", lambda host, port: ["10.9.8.7"])
        ref = manager.resolve(LoraSpec("https://eu.cdn.example/x.safetensors?token=secret"), trusted=False)
        with pytest.raises(LoraError, match="refused: host eu.cdn.example resolves to 10.9.8.7, which is private"):
            ref.source.result(timeout=30)
        assert connects == []
    finally:
        manager.close()


def test_operator_configured_urls_may_use_private_addresses(tmp_path, monkeypatch):
    # trusted=True (the engine's own config): any host, private addresses allowed; https still required.
    monkeypatch.setattr(safe_download, "resolve_host", lambda host, port: ["10.9.8.7"])

    def refuse(address, *args, **kwargs):
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(safe_download.socket, "create_connection", refuse)
    manager = LoraManager(EngineConfig(lora_cache_dir=str(tmp_path)))
    try:
        ref = manager.resolve(LoraSpec("https://models.internal/x.safetensors"), trusted=True)
        with pytest.raises(LoraError, match="could not be downloaded.*ConnectionRefusedError"):
            ref.source.result(timeout=30)
        with pytest.raises(LoraError, match="only https"):
            manager.resolve(LoraSpec("http://models.internal/x.safetensors"), trusted=True)
    finally:
        manager.close()
