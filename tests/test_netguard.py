"""netguard: the one copy of the address rules, followed by the proxy's fetcher and the engine's downloads."""

import ipaddress

import pytest

from local_backend import safe_download
from netguard import addresses
from proxy.media import fetch


@pytest.mark.parametrize(("address", "why"), [
    ("127.0.0.1", "loopback"),
    ("10.1.2.3", "private"),
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("100.64.0.1", "shared address space (CGNAT)"),
    ("255.255.255.255", "broadcast"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback (IPv4-mapped 127.0.0.1)"),
    ("64:ff9b::a9fe:a9fe", "link-local (NAT64 169.254.169.254)"),
    ("2002:0a00:0001::", "private (6to4 10.0.0.1)"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("192.0.2.1", "private"),  # documentation: the standard library calls it private
    ("8.8.8.8", None),
    ("2606:4700:4700::1111", None),
    ("64:ff9b::808:808", None),  # NAT64 of a public address
])
def test_address_refusal(address, why):
    assert addresses.address_refusal(ipaddress.ip_address(address)) == why


def test_numeric_hosts_as_inet_aton_reads_them():
    assert str(addresses.parse_numeric_host("2130706433")) == "127.0.0.1"
    assert str(addresses.parse_numeric_host("0177.0.0.1")) == "127.0.0.1"
    assert str(addresses.parse_numeric_host("127.1")) == "127.0.0.1"
    assert addresses.parse_numeric_host("example.com") is None
    with pytest.raises(ValueError):
        addresses.parse_numeric_host("256.0.0.1")


def test_host_names():
    assert addresses.host_name_problem("a." * 130) is not None
    assert addresses.host_name_problem("a..example") is not None
    assert addresses.host_name_problem("images.example") is None
    assert addresses.idna_host("*.Bücher.example.") == "*.xn--bcher-kva.example"


def test_one_copy_for_the_proxy_and_the_engine():
    """The proxy's fetcher and the engine's LoRA downloads judge an address by the same function."""
    assert fetch.address_refusal is addresses.address_refusal
    assert safe_download.address_refusal is addresses.address_refusal
    assert safe_download.DownloadPolicy(allowed_networks=("::ffff:10.0.0.0/104",)).address_allowed(
        ipaddress.ip_address("::ffff:10.1.2.3"))
