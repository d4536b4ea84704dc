"""The fast lane's C core (sensors/lane.c) through its binding: what it does for a pure TCP SYN it
may decide, and that it hands every other packet on unchanged (it acts only where the daemon
would block a fresh source on that packet; in doubt it defers). The daemon's side is tested in
tests/unit/service/test_lane.py; the lane against Python's parser in test_lane_props.py."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from portsentry.core.probe import KIND_FIN, KIND_NULL, KIND_SYN, KIND_XMAS, Mode
from portsentry.journal.syslog import LOG_NOTICE, frame
from portsentry.sensors.lane import RECORD_SLOT, Act, free_line
from portsentry.sensors.packet import classify_tcp
from tests.unit.sensors.lane_rig import (
    ATCP_PORT,
    HERE4,
    HERE6,
    PID,
    SCANNER4,
    SCANNER6,
    STCP_PORT,
    Rig,
    ip4,
    ip6,
    syn,
    tcp,
)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


# Each probe 1.2 names, its flag set and its letter in the record (ECE and CWR do not count).
PROBES = [(0x02, KIND_SYN, "S"), (0xC2, KIND_SYN, "S"), (0x01, KIND_FIN, "F"), (0x00, KIND_NULL, "N"),
          (0x29, KIND_XMAS, "X"), (0x2B, KIND_XMAS, "X"), (0xE9, KIND_XMAS, "X")]


@pytest.mark.parametrize(("source", "destination", "port", "mode"), [
    (SCANNER4, HERE4, ATCP_PORT, Mode.ATCP),
    (SCANNER6, HERE6, STCP_PORT, Mode.STCP),
])
@pytest.mark.parametrize(("flags", "kind", "letter"), PROBES)
def test_acts_on_a_stealth_probe(rig: Rig, source: object, destination: object, port: int, mode: Mode,
                                 flags: int, kind: str, letter: str) -> None:
    assert classify_tcp(flags) == kind  # as the daemon's parser names it
    source, destination = ip_address(source), ip_address(destination)  # type: ignore[arg-type]
    before = time.time()
    act = rig.one(syn(source, destination, port, flags=flags))
    after = time.time()
    assert isinstance(act, Act)
    assert (act.seq, act.source, act.destination, act.port, act.source_port, act.mode, act.kind) == (
        1, source, destination, port, 40000, mode, kind)
    assert act.sent and act.record_errno == 0 and act.spawn_errno == 0
    assert act.pid > 0 and act.pipe >= 0 and 0 < act.started <= time.monotonic()
    assert before <= act.at <= after
    message = f"attackalert: {kind} from host: {source}/{source} to TCP port: {port}"
    assert rig.lines() == [frame(message, LOG_NOTICE, "portsentry", PID, act.at)]
    [line] = rig.record_lines()
    seq, at, *rest = line.split()
    assert seq == "1" and abs(float(at) - act.at) < 2e-6
    assert rest == [str(source), str(port), mode.value, letter]
    assert rig.reap() == [""]
    assert rig.route_out.read_text() == f"{source} {port} {mode.value}\n"
    assert rig.lane.pinned(source)


def test_acts_without_a_route_or_a_record(tmp_path: Path) -> None:
    rig = Rig(tmp_path, route=False, record=False)
    try:
        act = rig.one(syn(SCANNER4, HERE4, ATCP_PORT))
        assert isinstance(act, Act)
        assert act.pid == -1 and act.pipe == -1 and act.spawn_errno == 0
        assert act.record_errno != 0 and act.sent
    finally:
        rig.close()


def deferred(rig: Rig, packet: bytes) -> bool:
    """`packet` handed on byte for byte with the next seq, nothing written for it."""
    rig.reap()
    rig.lines()
    seq, before = rig.capture.last_seq, rig.written()
    item = rig.one(packet)
    return item == packet and rig.capture.last_seq == seq + 1 and not rig.lines() and rig.written() == before


# Part of a connection (ACK, RST) or an "Unknown Type" the daemon words itself (SYN+FIN, ...).
FLAGS_HANDED_ON = [0x12, 0x10, 0x04, 0x06, 0x03, 0x0A, 0x22, 0x42 | 0x10, 0xFF, 0x39, 0x08, 0x20, 0x28]


@pytest.mark.parametrize("flags", FLAGS_HANDED_ON)
def test_defers_every_other_flag_set(rig: Rig, flags: int) -> None:
    assert classify_tcp(flags) not in (KIND_SYN, KIND_FIN, KIND_NULL, KIND_XMAS)
    assert deferred(rig, syn(SCANNER4, HERE4, ATCP_PORT, flags=flags))


def test_defers_while_disabled(rig: Rig) -> None:
    rig.lane.enable(False)
    assert deferred(rig, syn(SCANNER4, HERE4, ATCP_PORT))
    rig.lane.enable(True)
    assert isinstance(rig.one(syn(SCANNER4, HERE4, ATCP_PORT)), Act)


@pytest.mark.parametrize("kind", [socket.PACKET_OUTGOING, socket.PACKET_HOST])
def test_defers_our_own_outgoing_packets(rig: Rig, kind: int) -> None:
    """The lane reads the sender's address as AF_PACKET's sockaddr_ll: an abstract name whose
    byte at sll_pkttype's offset is 4 stands for PACKET_OUTGOING, 0 for PACKET_HOST."""
    rig.pair.theirs.bind(b"\0lane\0\0\0" + bytes([kind]) + str(os.getpid()).encode())
    packet = syn(SCANNER4, HERE4, ATCP_PORT)
    if kind == socket.PACKET_OUTGOING:
        assert deferred(rig, packet)
    else:
        assert isinstance(rig.one(packet), Act)


BAD_PACKETS = {
    "ipv4 options": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT), options=b"\x01\x01\x01\x00"),
    "more fragments": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT), fragment=0x2000),
    "fragment offset": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT), fragment=0x0001),
    "high fragment offset": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT), fragment=0x1000),
    "udp": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT), protocol=17),
    "udp6": ip6(str(SCANNER6), str(HERE6), tcp(ATCP_PORT), next_header=17),
    "ipv6 extension header": ip6(str(SCANNER6), str(HERE6), bytes([6, 0]) + bytes(6) + tcp(ATCP_PORT),
                                 next_header=0),
    "truncated ipv4": syn(SCANNER4, HERE4, ATCP_PORT)[:39],
    "truncated ipv6": syn(SCANNER6, HERE6, ATCP_PORT)[:59],
    "ipv4 total below tcp": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT), total=39),
    "ipv6 payload below tcp": ip6(str(SCANNER6), str(HERE6), tcp(ATCP_PORT), length=19),
    "ipv6 payload 0": ip6(str(SCANNER6), str(HERE6), tcp(ATCP_PORT), length=0),
    "tcp offset 4": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT, offset=4)),
    "tcp offset past ipv4 total": ip4(str(SCANNER4), str(HERE4), tcp(ATCP_PORT, offset=6)),
    "tcp offset past ipv6 payload": ip6(str(SCANNER6), str(HERE6), tcp(ATCP_PORT, offset=6)),
    "ip version 5": bytes([0x55]) + syn(SCANNER4, HERE4, ATCP_PORT)[1:],
    "empty": b"",
    "port 0": syn(SCANNER4, HERE4, 0),
    "unwatched port": syn(SCANNER4, HERE4, 82),
    "not to us": syn(SCANNER4, "198.18.0.2", ATCP_PORT),
    "not to us 6": syn(SCANNER6, "fd00::2", ATCP_PORT),
    "to our ipv4 address mapped in ipv6": syn(SCANNER6, "::ffff:198.18.0.1", ATCP_PORT),
    "source ipv4-mapped": syn("::ffff:198.18.0.10", HERE6, ATCP_PORT),
    "source ipv4-compatible": syn("::198.18.0.10", HERE6, ATCP_PORT),
    "source in ::/80": syn("::1:0:10", HERE6, ATCP_PORT),
    "source ::1": syn("::1", HERE6, ATCP_PORT),
    "source 0.0.0.0": syn("0.0.0.0", HERE4, ATCP_PORT),
    "source loopback": syn("127.0.0.1", HERE4, ATCP_PORT),
    "source multicast": syn("224.0.0.1", HERE4, ATCP_PORT),
    "source broadcast": syn("255.255.255.255", HERE4, ATCP_PORT),
    "source multicast 6": syn("ff02::1", HERE6, ATCP_PORT),
}


@pytest.mark.parametrize("name", BAD_PACKETS)
def test_defers_what_it_cannot_decide(rig: Rig, name: str) -> None:
    assert deferred(rig, BAD_PACKETS[name])


@pytest.mark.parametrize(("source", "denied"), [
    ("198.18.4.255", False), ("198.18.5.0", True), ("198.18.5.255", True), ("198.18.6.0", False),
    ("fd00:4:ffff:ffff:ffff:ffff:ffff:ffff", False), ("fd00:5::", True),
    ("fd00:5::ffff:ffff:ffff:ffff", True), ("fd00:5:0:1::", False),
])
def test_deny_ranges_to_their_edges(rig: Rig, source: str, denied: bool) -> None:
    port = ATCP_PORT
    packet = syn(source, HERE4 if "." in source else HERE6, port)
    if denied:
        assert deferred(rig, packet)
    else:
        assert isinstance(rig.one(packet), Act)


def test_defers_a_pinned_source_and_acts_once_unpinned(rig: Rig) -> None:
    rig.lane.pin(SCANNER4)
    assert deferred(rig, syn(SCANNER4, HERE4, ATCP_PORT))
    rig.lane.unpin(SCANNER4)
    assert isinstance(rig.one(syn(SCANNER4, HERE4, ATCP_PORT)), Act)
    second = syn(SCANNER4, HERE4, STCP_PORT)
    assert rig.one(second) == second  # pinned by its own act


def test_defers_once_the_allowance_is_used_up(rig: Rig) -> None:
    assert rig.lane.allow(0, 1) == 0
    assert isinstance(rig.one(syn(SCANNER4, HERE4, ATCP_PORT)), Act)
    assert deferred(rig, syn("198.18.0.11", HERE4, ATCP_PORT))
    assert rig.lane.allow(1, 1) == 1  # the daemon took the first in: one more may go
    assert isinstance(rig.one(syn("198.18.0.11", HERE4, ATCP_PORT)), Act)


def test_defers_at_the_shell_cap_until_a_shell_is_reaped(rig: Rig) -> None:
    rig.lane.set_shell_cap(1)
    assert isinstance(rig.one(syn(SCANNER4, HERE4, ATCP_PORT)), Act)
    packet = syn("198.18.0.11", HERE4, ATCP_PORT)
    assert rig.one(packet) == packet
    rig.reap()  # shell_done
    assert rig.route_out.exists()
    assert isinstance(rig.one(syn("198.18.0.12", HERE4, ATCP_PORT)), Act)


def test_defers_while_a_packet_handed_on_is_undecided(rig: Rig) -> None:
    ack = syn("198.18.0.20", HERE4, ATCP_PORT, flags=0x10)
    assert rig.one(ack, handled=False) == ack
    packet = syn(SCANNER4, HERE4, ATCP_PORT)
    assert rig.one(packet, handled=False) == packet
    rig.capture.handled()
    assert isinstance(rig.one(syn(SCANNER4, HERE4, ATCP_PORT)), Act)


def test_defers_when_a_socket_would_take_the_syn(rig: Rig) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        ports = bytearray(rig.ports)
        ports[port] = 2
        rig.lane.set_ports(bytes(ports))
        rig.lane.set_local([ip_address("127.0.0.1")])
        assert deferred(rig, syn(SCANNER4, "127.0.0.1", port))
        server.close()
        assert isinstance(rig.one(syn(SCANNER4, "127.0.0.1", port)), Act)


def test_defers_when_the_ignore_file_differs_from_the_list_in_force(rig: Rig, tmp_path: Path) -> None:
    ignore = tmp_path / "ignore"
    ignore.write_text("198.18.9.0/24\n")
    info = ignore.stat()
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    for stale in ((key[0] + 1, *key[1:]), (key[0], key[1] + 1, *key[2:]), (*key[:2], key[2] + 1, key[3]),
                  (*key[:3], key[3] + 1), None):
        rig.lane.set_ignore_file(str(ignore), stale)
        assert deferred(rig, syn(SCANNER4, HERE4, ATCP_PORT)), stale
    rig.lane.set_ignore_file(str(ignore), key)
    assert isinstance(rig.one(syn(SCANNER4, HERE4, ATCP_PORT)), Act)
    # Gone since: the list in force stays (config.ignore.IgnoreSource), so does the lane.
    rig.lane.set_ignore_file(str(tmp_path / "gone"), None)
    assert isinstance(rig.one(syn("198.18.0.11", HERE4, ATCP_PORT)), Act)
    rig.lane.set_ignore_file(str(tmp_path / "gone"), key)
    assert deferred(rig, syn("198.18.0.12", HERE4, ATCP_PORT))


def test_pins_one_by_one_and_many_in_both_families(rig: Rig) -> None:
    lane = rig.lane
    v4 = [ip_address(f"198.19.{i >> 8}.{i & 0xFF}") for i in range(5000)]
    v6 = [ip_address(f"fd00:7::{i:x}") for i in range(5000)]
    for address in v4[:2500]:
        lane.pin(address)
    lane.pin_many([a.packed for a in v4[2500:]] + [a.packed for a in v6])
    lane.pin(v4[0])  # twice: still one entry
    assert lane.pin_count() == 10000
    assert all(lane.pinned(a) for a in v4 + v6)
    # The IPv4 key is ::ffff:a.b.c.d: an IPv6 address with the same low bytes is another source.
    assert not lane.pinned(ip_address("::" + str(v4[1])))
    assert not lane.pinned(ip_address("fd00:7::1:0"))
    for address in v4[::2]:
        lane.unpin(address)
    lane.unpin(ip_address("203.0.113.1"))  # never pinned: nothing happens
    assert lane.pin_count() == 7500
    assert not any(lane.pinned(a) for a in v4[::2]) and all(lane.pinned(a) for a in v4[1::2] + v6)
    # Pinned and unpinned again many times over: deleted slots are reused, lookups still end.
    for _ in range(3):
        lane.pin_many([a.packed for a in v4[::2]])
        for address in v4[::2]:
            lane.unpin(address)
    assert lane.pin_count() == 7500 and lane.pinned(v6[-1]) and not lane.pinned(v4[0])
    lane.clear_pins()
    assert lane.pin_count() == 0 and not lane.pinned(v6[0])
    lane.pin(v6[0])
    assert lane.pin_count() == 1 and lane.pinned(v6[0])


def test_the_lane_pins_what_it_acted_for_and_the_daemon_may_unpin_it(rig: Rig) -> None:
    assert isinstance(rig.one(syn(SCANNER6, HERE6, ATCP_PORT)), Act)
    assert rig.lane.pinned(SCANNER6) and rig.lane.pin_count() == 1
    packet = syn(SCANNER6, HERE6, ATCP_PORT)
    assert rig.one(packet) == packet
    rig.lane.unpin(SCANNER6)  # the engine released it (Engine.released)
    assert isinstance(rig.one(syn(SCANNER6, HERE6, ATCP_PORT)), Act)


def test_each_ban_takes_a_free_line_of_the_record_and_freeing_it_empties_it(rig: Rig) -> None:
    acts = []
    for source in (SCANNER4, SCANNER6):
        act = rig.one(syn(source, HERE6 if source.version == 6 else HERE4, ATCP_PORT))
        assert isinstance(act, Act)
        acts.append(act)
    assert [act.line for act in acts] == [0, 1]
    assert [line.split()[0] for line in rig.record_lines()] == ["1", "2"]
    assert rig.record_path.stat().st_size == RECORD_SLOT * 512  # the ring's size, zeroed
    free_line(rig.record, acts[1].line)  # the second ban is in the store first: any order
    assert [line.split()[0] for line in rig.record_lines()] == ["1"]
    free_line(rig.record, acts[0].line)
    assert rig.record_lines() == []
    again = rig.one(syn("198.18.0.11", HERE4, ATCP_PORT))
    assert isinstance(again, Act) and again.line == 2  # on from where it was, wrapping at the end

def fill_the_channel(rig: Rig) -> int:
    """Packets into the lane, none read, until it stops taking them (its channel full); how many."""
    rig.lane.enable(False)
    rig.pair.theirs.setblocking(False)
    packet = syn(SCANNER4, HERE4, ATCP_PORT, flags=0x10)
    sent, stalled_since = 0, None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            rig.pair.theirs.send(packet)
            sent, stalled_since = sent + 1, None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.3:
                return sent
            time.sleep(0.01)
    raise AssertionError("the lane never stopped taking packets")


def drain(rig: Rig, until: threading.Thread) -> int:
    """Read the channel while `until` runs (a call stuck behind the full channel ends then)."""
    read = 0
    while True:
        batch = rig.capture.read_items()
        read += len(batch)
        if not batch and not until.is_alive():
            return read
        until.join(0.01)


def test_a_full_channel_never_holds_the_daemons_calls(rig: Rig) -> None:
    fill_the_channel(rig)

    def daemon_calls() -> None:
        rig.lane.processed(1)
        rig.lane.allow(0, 5)
        rig.lane.pin(SCANNER6)

    calls = threading.Thread(target=daemon_calls)
    calls.start()
    calls.join(2.0)
    stuck = calls.is_alive()
    drain(rig, calls)
    assert not stuck, "the main loop waited for the lane, which waited for the main loop"

def test_a_stop_with_the_channel_full_hands_over_every_packet_the_lane_took(rig: Rig) -> None:
    sent = fill_the_channel(rig)
    handed: list[object] = []
    stopping = threading.Thread(target=lambda: handed.extend(rig.capture.stop()))
    stopping.start()
    stopping.join(5.0)
    stuck = stopping.is_alive()
    late = drain(rig, stopping)
    assert not stuck, "the stop waited for the lane, which waited for the main loop to read"
    left = 0  # still in the capture's buffer: the lane stops after the batch it is in
    with contextlib.suppress(BlockingIOError):
        while rig.pair.ours.recv(4096):
            left += 1
    assert len(handed) + left == sent and late == 0
    assert all(item == syn(SCANNER4, HERE4, ATCP_PORT, flags=0x10) for item in handed)


def test_the_record_ring_never_overwrites_a_line_whose_ban_is_not_settled(tmp_path: Path) -> None:
    """512 lines wait for the daemon (a KILL_ROUTE hanging, its main loop far behind), freed in
    any order: the lane's next ban finds no free line, so it starts no command for it (the daemon
    then runs KILL_ROUTE after its own record), and no line written is overwritten."""
    rig = Rig(tmp_path, route=False)
    rig.lane.allow(0, 10_000)
    try:
        for i in range(512):
            act = rig.one(syn(f"198.18.{2 + i // 250}.{1 + i % 250}", HERE4, ATCP_PORT))
            assert isinstance(act, Act) and act.record_errno == 0 and act.line == i
        late = rig.one(syn("198.18.9.9", HERE4, ATCP_PORT))
        assert isinstance(late, Act) and late.record_errno == errno.ENOSPC and late.line == -1
        assert late.pid == -1
        assert len(rig.record_lines()) == 512
        free_line(rig.record, 300)  # a later ban is in the store before the first ones
        freed = rig.one(syn("198.18.9.10", HERE4, ATCP_PORT))
        assert isinstance(freed, Act) and freed.record_errno == 0 and freed.line == 300
        lines = rig.record_lines()
        assert len(lines) == 512 and lines[300].split()[2] == "198.18.9.10"
        assert lines[0].split()[2] == "198.18.2.1" and lines[299].split()[2] == "198.18.3.50"
    finally:
        rig.close()

def test_a_new_lane_leaves_the_lines_of_the_lane_before_it(tmp_path: Path) -> None:
    """A reload: the new lane maps the same file; a line the old lane wrote, whose ban is not in
    the store yet, is neither overwritten nor lost, and is freed when that ban is."""
    first = Rig(tmp_path, route=False)
    try:
        old = first.one(syn("198.18.0.10", HERE4, ATCP_PORT))
    finally:
        first.close()
    assert isinstance(old, Act) and old.line == 0
    (tmp_path / "second").mkdir()
    second = Rig(tmp_path / "second", route=False)
    record = os.open(first.record_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        second.lane.set_record(record)
        new = second.one(syn("198.18.0.11", HERE4, ATCP_PORT))
        assert isinstance(new, Act) and new.line == 1
        assert [line.split()[2] for line in first.record_lines()] == ["198.18.0.10", "198.18.0.11"]
        free_line(record, old.line)  # by the daemon, the old lane long gone
        assert [line.split()[2] for line in first.record_lines()] == ["198.18.0.11"]
    finally:
        second.close()
        os.close(record)


def test_packets_of_known_sources_go_together_in_order_and_do_not_hold_the_lane(rig: Rig) -> None:
    """A flood from a banned host: its packets reach the daemon in one message (not one wake-up
    each), after whatever came before and before whatever comes after, and a fresh scanner's
    first SYN meanwhile is still the lane's."""
    rig.lane.pin(SCANNER4)
    flood = [syn(SCANNER4, HERE4, 1000 + i) for i in range(40)]
    for packet in flood:
        rig.send(packet)
    fresh = syn("198.18.0.11", HERE4, ATCP_PORT)
    rig.send(fresh)
    items = rig.items(41)
    assert items[:40] == flood  # in order, each byte for byte, and first
    assert isinstance(items[40], Act) and items[40].source == ip_address("198.18.0.11")
    seqs = rig.capture.last_seq
    assert seqs == 41  # every packet counted, the act last
    # Alone, they go within a few milliseconds (COALESCE_MS), not at the next packet.
    rig.send(syn(SCANNER4, HERE4, 2000))
    assert rig.items(1, timeout=1.0) == [syn(SCANNER4, HERE4, 2000)]


def test_a_burst_from_a_known_source_is_one_message(rig: Rig) -> None:
    rig.lane.pin(SCANNER4)
    for i in range(10):
        rig.send(syn(SCANNER4, HERE4, 1000 + i))
    time.sleep(0.1)  # past COALESCE_MS
    assert rig.lane.channel is not None
    message = rig.lane.channel.recv(70000)
    assert message[:1] == b"M" and int.from_bytes(message[4:8], "little") == 10
