"""Forward mode's destination policy, its pure part: which addresses count as non-public and which
as this machine's (tests/test_e2e_egress.py drives it through the real proxy)."""

from __future__ import annotations

import ipaddress

import pytest
from ilink_fixproxy.egress import embedded_ipv4, is_this_machine, non_public_kind, refusal


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible (deprecated) form
        ("2002:7f00:1::", "loopback"),  # 6to4
        ("64:ff9b::7f00:1", "loopback"),  # NAT64
        ("0.0.0.0", "unspecified (this machine)"),
        ("::", "unspecified (this machine)"),
        ("10.0.0.1", "private"),
        ("fd12::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fec0::1", "site-local"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "non-public"),
        ("240.0.0.1", "private"),  # reserved; Python counts it private
        ("::ffff:8.8.8.8", None),
    ],
)
def test_non_public_kind(address: str, kind: str | None):
    assert non_public_kind(ipaddress.ip_address(address)) == kind


def test_embedded_ipv4_is_only_found_where_there_is_one():
    assert embedded_ipv4(ipaddress.ip_address("2001:4860::1")) is None
    assert embedded_ipv4(ipaddress.ip_address("::1")) is None
    assert embedded_ipv4(ipaddress.ip_address("::ffff:10.1.2.3")) == ipaddress.ip_address("10.1.2.3")


def test_own_listeners_are_refused_on_this_machine_only():
    listeners = {9464: "metrics"}
    loopback = ipaddress.ip_address("127.0.0.1")
    assert is_this_machine(loopback) and is_this_machine(ipaddress.ip_address("0.0.0.0"))
    assert not is_this_machine(ipaddress.ip_address("192.0.2.1"))  # TEST-NET-1: nobody's address
    assert refusal(loopback, 9464, True, listeners) == "it is this proxy's own metrics listener"
    assert refusal(loopback, 9465, True, listeners) is None
    assert refusal(ipaddress.ip_address("8.8.8.8"), 9464, False, listeners) is None
