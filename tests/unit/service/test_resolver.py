"""Reverse DNS names are attacker-controlled: anything but a plain host name becomes the address."""

from __future__ import annotations

import threading
from ipaddress import ip_address

import pytest

from portsentry.service.resolver import Resolver, safe_name

A = ip_address("198.18.0.2")


@pytest.mark.parametrize("name", ["scanner.example", "host-1.example.org", "a", "x_y.example"])
def test_plain_host_names_are_kept(name):
    assert safe_name(name, A) == name


@pytest.mark.parametrize("name", ["$(touch /tmp/x).example", "a`id`b.example", "x;reboot", "a b",
                                  "-leading.example", "", "x" * 300, "evil\n.example", "\"quoted\"",
                                  "evil.example\n", "x" * 253 + "\n"])
def test_hostile_or_odd_names_become_the_address(name):
    assert safe_name(name, A) == "198.18.0.2"


# --- off the detection loop (issue 10.4) ------------------------------------------------------


class Answers:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.event = threading.Event()

    def __call__(self, name: str) -> None:
        self.names.append(name)
        self.event.set()

    def wait(self) -> list[str]:
        assert self.event.wait(5)
        return self.names


def test_lookups_answer_later_and_are_cached() -> None:
    release = threading.Event()

    def slow_ptr(address: str) -> str:
        release.wait(5)
        return "scanner.example"

    resolver = Resolver(timeout=5.0, ptr=slow_ptr)
    answers = Answers()
    assert resolver.lookup(A, answers) is None  # the caller does not wait
    release.set()
    assert answers.wait() == ["scanner.example"]
    assert resolver.lookup(A, answers) == "scanner.example"  # cached: at once
    resolver.close()


def test_a_slow_lookup_gives_the_address_at_its_deadline_and_the_queue_is_bounded() -> None:
    release = threading.Event()

    def stuck(address: str) -> str:
        release.wait(5)
        return "late.example"

    resolver = Resolver(timeout=0.1, pending=1, ptr=stuck)
    answers = Answers()
    assert resolver.lookup(A, answers) is None
    assert resolver.lookup(ip_address("198.18.0.3"), answers) == "198.18.0.3"  # full: the address
    assert resolver.full == 1
    assert answers.wait() == ["198.18.0.2"]
    release.set()
    resolver.close()
