"""Many bans made or lifted at once: one transaction, one kernel batch, one hosts.deny write (issue 10.3)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from portsentry.bans.bulk import AddressListError, ManualSteps, block_many, read_addresses, unblock_many
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult
from tests.unit.bans.test_lifecycle import Kernel

T0 = 1_700_000_000.0


def manager(tmp_path: Path) -> tuple[BanManager, Kernel, list[str], list[str]]:
    kernel, said, ran = Kernel(), list[str](), list[str]()
    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=600), said.append)
    return bans, kernel, said, ran


def recorder(ran: list[str]):
    def run(command: str, timeout: float) -> CommandResult:
        ran.append(command)
        return CommandResult(command, 0, False, "", 0.0)
    return run


def test_read_addresses_names_each_bad_line():
    lines = ["# feed of 2026-12-05", "198.18.0.1", "", "198.18.0.1  # again", "::ffff:198.18.0.2",
             "fd00::9", "not-an-ip", "300.1.1.1"]
    with pytest.raises(AddressListError) as error:
        read_addresses(lines, "feed.txt")
    assert str(error.value) == ("feed.txt:7: 'not-an-ip' is not an IP address\n"
                                "feed.txt:8: '300.1.1.1' is not an IP address")
    assert read_addresses(lines[:6], "feed.txt") == [ip_address("198.18.0.1"), ip_address("198.18.0.2"),
                                                     ip_address("fd00::9")]


def test_a_listed_zone_id_is_the_same_host(tmp_path):
    # A scoped address was kept as given: the unblock report then named "fe80::1%eth0" as not
    # blocked although its ban (stored as fe80::1) was lifted.
    assert read_addresses(["fe80::1%eth0", "fe80::1"], "feed.txt") == [ip_address("fe80::1")]
    bans, _kernel, _said, ran = manager(tmp_path)
    addresses = read_addresses(["fe80::1%eth0"], "feed.txt")
    assert block_many(bans, ManualSteps(), addresses, T0, 60.0, recorder(ran)).done == 1
    result = unblock_many(bans, ManualSteps(), read_addresses(["fe80::1%eth0"], "feed.txt"), T0 + 1,
                          recorder(ran))
    assert (result.done, result.skipped) == (1, [])


def test_many_bans_in_one_go_and_back(tmp_path):
    bans, kernel, _said, ran = manager(tmp_path)
    deny = tmp_path / "hosts.deny"
    deny.write_text("ALL: 198.19.0.7\n")  # the admin's own line for one of them
    addresses = [IPv4Address(int(IPv4Address("198.19.0.0")) + n) for n in range(1000)]
    steps = ManualSteps(hosts_deny="ALL: $TARGET$", route="ip route add blackhole $TARGET$",
                        undo="ip route del blackhole $TARGET$")
    result = block_many(bans, steps, [*addresses, ip_address("224.0.0.1")], T0, "policy", recorder(ran))
    assert result.done == 1000 and result.failed_commands == 0
    assert result.skipped == ["224.0.0.1: a multicast address cannot be the source of a real packet"]
    assert bans.store.active_count(T0) == 1000
    assert set(kernel.held) == set(addresses) and set(kernel.held.values()) == {600.0}
    lines = deny.read_text().splitlines()
    assert len(lines) == 1000 and lines.count("ALL: 198.19.0.7") == 1
    assert len(ran) == 1000
    assert not bans.store.owns_line(ip_address("198.19.0.7"), "ALL: 198.19.0.7")  # the admin's
    assert bans.store.owns_line(ip_address("198.19.0.8"), "ALL: 198.19.0.8")
    changes = bans.store.changes(after=0)
    assert len(changes) == 1000 and {c.kind for c in changes} == {"ban"}

    ran.clear()
    cursor = bans.store.last_change()
    result = unblock_many(bans, steps, [*addresses, ip_address("198.18.5.5")], T0 + 1, recorder(ran))
    assert result.done == 1000 and result.skipped == ["198.18.5.5: not blocked"]
    assert kernel.held == {} and bans.store.active_count(T0 + 1) == 0
    lifts = bans.store.changes(after=cursor)
    assert len(lifts) == 1000 and {(c.kind, c.origin) for c in lifts} == {("lift", "local")}
    assert bans.store.offences(ip_address("198.19.0.8")) == 1
    assert deny.read_text() == "ALL: 198.19.0.7\n"  # ours gone, theirs kept
    assert sorted(ran) == sorted(f"ip route del blackhole {a}" for a in addresses)


def test_forever_and_fixed_durations(tmp_path):
    bans, kernel, _said, ran = manager(tmp_path)
    a, b = ip_address("198.18.0.1"), ip_address("198.18.0.2")
    block_many(bans, ManualSteps(), [a], T0, None, recorder(ran))
    block_many(bans, ManualSteps(), [b], T0, 90.0, recorder(ran))
    assert kernel.held == {a: None, b: 90.0}
    assert ran == []


def test_unblock_many_local_lifts_on_this_host_only(tmp_path):
    """`unblock --file F --local`: the lifts carry origin local-only, which the fleet publisher
    does not send, as a single `unblock --local` does."""
    bans, kernel, _said, ran = manager(tmp_path)
    addresses = [ip_address("198.19.1.1"), ip_address("198.19.1.2")]
    block_many(bans, ManualSteps(), addresses, T0, None, recorder(ran))
    cursor = bans.store.last_change()
    result = unblock_many(bans, ManualSteps(), addresses, T0 + 1, recorder(ran), local=True)
    assert result.done == 2 and kernel.held == {}
    lifts = bans.store.changes(after=cursor)
    assert {(c.kind, c.origin) for c in lifts} == {("lift", "local-only")}


def test_an_unusable_hosts_deny_is_said_and_the_rest_still_done(tmp_path):
    # A symlinked hosts.deny (refused by HostsDeny) made `block --file` end in a traceback after
    # the store and the kernel had the bans, with KILL_ROUTE never run for any of them, and
    # `unblock --file` end the same way before lifting anything.
    (tmp_path / "real").write_text("")
    bans, kernel, said, ran = manager(tmp_path)
    (tmp_path / "hosts.deny").symlink_to(tmp_path / "real")
    addresses = [ip_address("198.18.0.1"), ip_address("198.18.0.2")]
    steps = ManualSteps(hosts_deny="ALL: $TARGET$", route="route $TARGET$", undo="undo $TARGET$")
    result = block_many(bans, steps, addresses, T0, None, recorder(ran))
    assert (result.done, result.failed_steps) == (2, 1)
    assert set(kernel.held) == set(addresses) and sorted(ran) == ["route 198.18.0.1", "route 198.18.0.2"]
    assert any("through a symlink" in line for line in said)
    assert (tmp_path / "real").read_text() == ""

    # Lines we did write, with hosts.deny unusable by the time of the lift: still lifted.
    (tmp_path / "hosts.deny").unlink()
    (tmp_path / "hosts.deny").write_text("")
    other = [ip_address("198.18.0.3")]
    block_many(bans, steps, other, T0, None, recorder(ran))
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.3\n"
    (tmp_path / "hosts.deny").rename(tmp_path / "real")
    (tmp_path / "hosts.deny").symlink_to(tmp_path / "real")
    said.clear()
    result = unblock_many(bans, steps, [*addresses, *other], T0 + 1, recorder(ran))
    assert (result.done, result.failed_steps) == (3, 1)
    assert kernel.held == {} and bans.store.active_count(T0 + 1) == 0
    assert any("through a symlink" in line for line in said)
    # Still ours, so `hosts-deny tidy` can take it out once the file is usable again.
    assert bans.store.owns_line(ip_address("198.18.0.3"), "ALL: 198.18.0.3")


def test_one_huge_line_is_neither_held_whole_nor_echoed_back(tmp_path):
    # A feed of one 20 MB line (a binary file given by mistake) was read into memory whole and
    # its 20 MB were printed back in the error message.
    import tracemalloc

    from portsentry.bans.bulk import MAX_LINE, feed_lines

    feed = tmp_path / "feed"
    feed.write_bytes(b"198.18.0.1\n" + b"A" * 20_000_000 + b"\n198.18.0.2\n# " + b"c" * 10_000 + b"\n")
    tracemalloc.start()
    try:
        with open(feed, encoding="utf-8", errors="replace") as handle, \
                pytest.raises(AddressListError) as error:
            read_addresses(feed_lines(handle), "feed")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    assert str(error.value) == f"feed:2: longer than {MAX_LINE} characters: {'A' * 60!r}..."
    with open(feed, encoding="utf-8", errors="replace") as handle:
        assert read_addresses((line for n, line in enumerate(feed_lines(handle)) if n != 1), "feed") == [
            ip_address("198.18.0.1"), ip_address("198.18.0.2")]  # the long comment is a comment


def test_a_feed_of_nothing_but_bad_lines_keeps_twenty_of_them():
    # Every bad line's message was kept until the end, to print 20 of them: 200,000 bad lines
    # took 30 MB, a million (a wrong file) 150 MB.
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(AddressListError) as error:
            read_addresses((f"bad{n}" for n in range(200_000)), "feed")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    lines = str(error.value).splitlines()
    assert len(lines) == 21 and lines[0] == "feed:1: 'bad0' is not an IP address"
    assert lines[-1] == "... and 199980 more"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
@example(b"\x00" * 23)  # each quoted as \x00: 23 characters made a line of 123
@example(b"\x01" * 59 + b"\xff")
def test_any_bytes_are_addresses_or_one_bounded_error(data):
    import io

    from portsentry.bans.bulk import feed_lines

    handle = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace")
    try:
        found = read_addresses(feed_lines(handle), "feed")
    except AddressListError as error:
        lines = str(error).splitlines()
        assert 1 <= len(lines) <= 21
        assert all(line.startswith("feed:") or line.startswith("... and ") for line in lines)
        assert all(len(line) < 120 for line in lines)
    else:
        assert len(found) == len(set(found)) and all(isinstance(a, IPv4Address | IPv6Address) for a in found)


def test_a_block_of_kill_run_cmd_alone_runs_it_and_records_nothing(tmp_path):
    # As `portsentry block ADDR` does (and 1.2's BLOCK_x="2"): with no backend, no hosts.deny
    # line and no KILL_ROUTE, nothing holds a ban. By --file every address was recorded anyway:
    # `list` showed bans nothing held, the daemon reported them, the fleet shared them.
    said, ran = list[str](), list[str]()
    bans = BanManager(BanStore(MEMORY), None, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=600), said.append)
    addresses = [ip_address("198.19.0.1"), ip_address("198.19.0.2")]
    result = block_many(bans, ManualSteps(run_cmd="notify $TARGET$"), addresses, T0, "policy", recorder(ran))
    assert sorted(ran) == ["notify 198.19.0.1", "notify 198.19.0.2"]
    assert result.done == 2 and result.failed_commands == 0
    assert bans.store.active_count(T0) == 0 and bans.store.history() == []
