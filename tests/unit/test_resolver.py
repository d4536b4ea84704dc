"""Reverse DNS names are attacker-controlled: anything but a plain host name becomes the address."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from portsentry.resolver import safe_name

A = ip_address("198.18.0.2")


@pytest.mark.parametrize("name", ["scanner.example", "host-1.example.org", "a", "x_y.example"])
def test_plain_host_names_are_kept(name):
    assert safe_name(name, A) == name


@pytest.mark.parametrize("name", ["$(touch /tmp/x).example", "a`id`b.example", "x;reboot", "a b",
                                  "-leading.example", "", "x" * 300, "evil\n.example", "\"quoted\"",
                                  "evil.example\n", "x" * 253 + "\n"])
def test_hostile_or_odd_names_become_the_address(name):
    assert safe_name(name, A) == "198.18.0.2"
