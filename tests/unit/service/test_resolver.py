"""Reverse DNS names are attacker-controlled: anything but a plain host name becomes the address."""

from __future__ import annotations

import re
import socket
import threading
import time
from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# A PTR name is chosen by whoever owns the scanner's reverse zone. One that reads as an address
# is never a host name (RFC 1123 2.1: the top label is not numeric) and names another host:
# fail2ban's `Host: <HOST>` filter (portsentry's own 1.2.x branch) bans the address it reads
# there, and inet_aton-style parsers take 2130706433 or 0x7f.1 for 127.0.0.1.
@pytest.mark.parametrize("name", ["10.9.8.7", "192.168.1.1", "10.9.8.6.static.example", "127.1",
                                  "2130706433", "0x7f000001", "0x7f.1", "scanner.example.123",
                                  "1.2.3.4.5", "010.001.002.003"])
def test_names_that_read_as_an_address_become_the_address(name):
    assert safe_name(name, A) == "198.18.0.2"


@pytest.mark.parametrize("name", ["host-10-9-8-7.example", "7.example", "1-2-3-4.isp.example",
                                  "a1.b2.example", "10.9.8.example"])
def test_names_with_digits_that_are_not_addresses_are_kept(name):
    assert safe_name(name, A) == name


# fail2ban 1.0's <HOST> as it expands it (fail2ban-regex -l heavydebug shows it): an address
# wherever it finds one at the start, however the name goes on.
_FAIL2BAN_IP4 = re.compile(r"(?:::f{4,6}:)?(?:\d{1,3}\.){3}\d{1,3}")


@given(st.text(alphabet="0123456789abcdefx.-_", min_size=1, max_size=40))
def test_no_kept_name_gives_fail2ban_or_inet_aton_another_address(name):
    kept = safe_name(name, A)
    if kept == "198.18.0.2":
        return
    assert not _FAIL2BAN_IP4.match(kept)
    with pytest.raises(OSError):
        socket.inet_aton(kept)


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


def test_lookups_past_their_deadline_still_count_against_the_bound() -> None:
    """A name server that never answers: each lookup gives the address at its deadline, but its
    query still waits for a worker. The bound was on callers waiting, not on queries queued, so
    every deadline let another in: under a scan from new sources the queue grew without end (a
    soak at 25 sources a second: 180 KB a second, and DNS queries for hours after the scan)."""
    release = threading.Event()
    asked: list[str] = []

    def stuck(address: str) -> str:
        asked.append(address)
        release.wait(5)
        return "late.example"

    resolver = Resolver(timeout=0.02, pending=4, ptr=stuck)
    answers = Answers()
    for n in range(40):
        resolver.lookup(ip_address(f"198.18.7.{n + 1}"), answers)
        time.sleep(0.03)  # past the deadline: the caller has its answer
    assert resolver.full >= 30
    release.set()
    deadline = time.monotonic() + 5
    while len(asked) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # any queued beyond the bound would be asked now
    resolver.close()
    assert len(asked) <= 4, asked


def test_a_name_that_is_not_utf8_gives_the_address_at_once_and_is_cached() -> None:
    """getnameinfo raises UnicodeDecodeError, not OSError, for a name whose bytes are not UTF-8
    (an /etc/hosts or NSS module's answer: checked with a private /etc/hosts). That escaped the
    lookup, so the source's hits waited the whole timeout, and every later hit asked again."""
    asked: list[str] = []

    def not_utf8(address: str) -> str:
        asked.append(address)
        return b"bad\xff.example".decode("utf-8")

    resolver = Resolver(timeout=5.0, ptr=not_utf8)
    answers = Answers()
    started = time.monotonic()
    assert resolver.lookup(A, answers) is None
    assert answers.wait() == ["198.18.0.2"]
    assert time.monotonic() - started < 2.0
    assert resolver.lookup(A, answers) == "198.18.0.2" and asked == ["198.18.0.2"]
    resolver.close()


# fail2ban 1.0's own expansion of <HOST> (fail2ban-regex -l heavydebug prints it).
_F2B_HOST = (r"(?:\[?(?:(?:::f{4,6}:)?(?P<ip4>(?:\d{1,3}\.){3}\d{1,3})|(?P<ip6>(?:[0-9a-fA-F]{1,4}::?|::)"
             r"{1,7}(?:[0-9a-fA-F]{1,4}|(?<=:):)))\]?|(?P<dns>[\w\-.^_]*\w))")
DEBIAN_FILTER = re.compile(r"\/" + _F2B_HOST + r" Port\: [0-9]+ (TCP|UDP) Blocked$")
BRANCH_1_2_FILTER = re.compile(r"^\d* - \d{2}\/\d{2}\/\d{4} \d{2}:\d{2}:\d{2} Host: " + _F2B_HOST)


_LABEL = st.one_of(st.integers(0, 999).map(str), st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True))
_PTR = st.one_of(st.text(max_size=80), st.lists(_LABEL, min_size=1, max_size=6).map(".".join))


@given(_PTR, st.sampled_from([A, ip_address("fd00::2")]))
def test_whatever_the_ptr_says_fail2ban_reads_the_scanner_s_address_or_a_name(ptr, address):
    """A history line with the kept name: Debian's filter finds the scanner's address, and the
    1.2.x branch's finds that address or a DNS name, never another address."""
    from portsentry.core.probe import Protocol
    from portsentry.journal.files import history_line

    line = history_line(1.7e9, safe_name(ptr, address), address, 22, Protocol.TCP)
    debian = DEBIAN_FILTER.search(line)
    assert debian is not None and ip_address(debian["ip4"] or debian["ip6"]) == address, line
    branch = BRANCH_1_2_FILTER.match(line)
    assert branch is not None, line
    found = branch["ip4"] or branch["ip6"]
    assert found is None or ip_address(found) == address, line
