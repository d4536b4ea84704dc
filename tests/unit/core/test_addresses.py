"""One canonical form per host, and the sources that can never be real (issue 9.1)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.core.addresses import BadSource, canonical, impossible_source, possible_networks

v4 = st.integers(0, 2**32 - 1).map(IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(IPv6Address)


@given(v4)
def test_ipv4_mapped_and_compatible_forms_are_the_ipv4_host(address):
    assert canonical(IPv6Address(f"::ffff:{address}")) == address
    if int(address) > 1:
        assert canonical(IPv6Address(int(address))) == address
    assert canonical(address) is address


@given(v4 | v6)
def test_canonical_is_idempotent_and_keeps_other_ipv6(address):
    once = canonical(address)
    assert canonical(once) == once
    if isinstance(address, IPv6Address) and int(address) >> 32 not in (0, 0xFFFF):
        assert once is address


def test_ipv6_own_unspecified_and_loopback_stay_ipv6():
    assert canonical(IPv6Address("::")) == IPv6Address("::")
    assert canonical(IPv6Address("::1")) == IPv6Address("::1")


@given(v4)
def test_ipv4_verdict_agrees_with_the_standard_library(address):
    bad = impossible_source(address)
    expected = (
        BadSource.UNSPECIFIED if address in IPv4Network("0.0.0.0/8")
        else BadSource.LOOPBACK if address.is_loopback
        else BadSource.MULTICAST if address.is_multicast
        else BadSource.BROADCAST if address == IPv4Address("255.255.255.255")
        else BadSource.RESERVED if address.is_reserved
        else None
    )
    assert bad is expected


@given(v6)
def test_ipv6_verdict_agrees_with_the_standard_library(address):
    expected = (
        BadSource.UNSPECIFIED if address.is_unspecified
        else BadSource.LOOPBACK if address.is_loopback
        else BadSource.MULTICAST if address.is_multicast
        else None
    )
    assert impossible_source(address) is expected


def test_subnet_broadcasts_given_by_the_caller():
    broadcasts = {IPv4Address("198.18.0.255")}
    assert impossible_source(IPv4Address("198.18.0.255"), broadcasts) is BadSource.BROADCAST
    assert impossible_source(IPv4Address("198.18.0.254"), broadcasts) is None


@pytest.mark.parametrize("text", ["198.18.0.2", "fd00::2", "2001:db8::1"])
def test_ordinary_sources_pass(text):
    assert impossible_source(canonical(ip_address(text))) is None


def test_possible_networks_leave_out_any_that_touch_an_impossible_source():
    listed = [ip_network(text) for text in ("127.0.0.1/32", "198.18.0.0/15", "0.0.0.0/0", "::1/128",
                                            "fd00::/8", "::/0", "224.0.0.0/4", "10.0.0.0/8")]
    assert possible_networks(listed) == (ip_network("198.18.0.0/15"), ip_network("fd00::/8"),
                                         ip_network("10.0.0.0/8"))
