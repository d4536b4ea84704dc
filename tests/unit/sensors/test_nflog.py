"""NFLOG capture without root: the nfnetlink_log parser (fuzzed), the config requests as bytes,
NflogCapture over a scripted fake socket (batches, sequence gaps, ENOBUFS, a group in use), the
nftables capture rules as golden nft text, the new config keys and the factory's choice."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.config.settings import Config, ConfigError, parse_config
from portsentry.core.probe import Mode, Protocol
from portsentry.responders.backend import RunResult
from portsentry.responders.nft_capture import CaptureSpec
from portsentry.responders.nftables import NftablesBackend
from portsentry.sensors.capture import CaptureError, CaptureStats
from portsentry.sensors.nflog import (
    NflogCapture,
    NflogGroupTaken,
    ack_errno,
    bind_attributes,
    config_message,
    mode_attributes,
    parse_nflog,
    parse_nflog_batch,
)
from portsentry.service import wiring as factory
from tests.unit.responders.test_backend import Recorder

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "150")), deadline=None)

# -- hand-built kernel messages (struct layouts written out here, not imported) -----------------

ULOG_PACKET = (4 << 8) | 0
ULOG_CONFIG = (4 << 8) | 1
SYN = bytes.fromhex("4500002c00010000400600000c6112020c610001") + bytes.fromhex(
    "d4310001000000000000000060020400000000000204")  # IPv4 SYN to port 1 (+ MSS option)


def nla(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def nlmsg(kind: int, body: bytes, seq: int = 0, flags: int = 0) -> bytes:
    """One netlink message, padded to 4 bytes as the kernel lays them out."""
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body + b"\0" * (-len(body) % 4)


def packet_msg(payload: bytes | None, seq: int | None = None, family: int = 2) -> bytes:
    attrs = nla(1, struct.pack("!HBB", 0x0800, 1, 0))  # NFULA_PACKET_HDR: hw proto, hook input
    attrs += nla(4, struct.pack("!I", 2))  # NFULA_IFINDEX_INDEV
    attrs += nla(3, struct.pack("!QQ", 1, 2))  # NFULA_TIMESTAMP
    if seq is not None:
        attrs += nla(12, struct.pack("!I", seq))
    if payload is not None:
        attrs += nla(9, payload)
    return nlmsg(ULOG_PACKET, struct.pack("!BBH", family, 0, 7373) + attrs)


def done_msg() -> bytes:
    return nlmsg(3, struct.pack("!BBH", 0, 0, 7373))


def batch_of(payloads: list[bytes], first_seq: int | None = 0) -> bytes:
    msgs = [packet_msg(p, None if first_seq is None else (first_seq + i) % (1 << 32))
            for i, p in enumerate(payloads)]
    return b"".join(msgs) + (done_msg() if len(msgs) > 1 else b"")


def ack(seq: int, code: int = 0) -> bytes:
    original = struct.pack("=IHHII", 36, ULOG_CONFIG, 5, seq, 0)
    return nlmsg(2, struct.pack("=i", -code) + original)


# -- parse_nflog ---------------------------------------------------------------------------------


def test_parse_batch_returns_payloads_in_order_and_sequence_range() -> None:
    data = batch_of([SYN, SYN[:30], b"\x60" + bytes(47)], first_seq=41)
    batch = parse_nflog_batch(data)
    assert batch.payloads == [SYN, SYN[:30], b"\x60" + bytes(47)]
    assert (batch.errors, batch.first_seq, batch.last_seq) == (0, 41, 43)
    assert parse_nflog(data) == ([SYN, SYN[:30], b"\x60" + bytes(47)], 0)


def test_parse_single_packet_without_done_and_without_seq() -> None:
    batch = parse_nflog_batch(packet_msg(SYN))
    assert batch.payloads == [SYN]
    assert (batch.errors, batch.first_seq, batch.last_seq) == (0, None, None)


def test_nested_and_byteorder_flags_do_not_hide_the_payload_type() -> None:
    body = struct.pack("!BBH", 2, 0, 1) + nla(9 | 0x4000, SYN)
    assert parse_nflog(nlmsg(ULOG_PACKET, body)) == ([SYN], 0)


def test_only_a_four_byte_seq_counts_and_the_last_one_wins() -> None:
    body = struct.pack("!BBH", 2, 0, 1) + nla(12, struct.pack("!I", 7)) + nla(12, struct.pack("!I", 8))
    body += nla(12, b"\0\0\0\0\0") + nla(9, SYN)
    batch = parse_nflog_batch(nlmsg(ULOG_PACKET, body) + packet_msg(SYN, seq=9))
    assert (batch.payloads, batch.errors, batch.first_seq, batch.last_seq) == ([SYN, SYN], 0, 8, 9)
    short = struct.pack("!BBH", 2, 0, 1) + nla(12, b"\0\1") + nla(9, SYN)
    assert parse_nflog_batch(nlmsg(ULOG_PACKET, short)).first_seq is None


@pytest.mark.parametrize(
    ("data", "payloads", "errors"),
    [
        (b"", [], 0),
        (b"\x01\x02\x03", [], 1),  # shorter than a header
        (struct.pack("=IHHII", 8, ULOG_PACKET, 0, 0, 0), [], 1),  # length below the header
        (struct.pack("=IHHII", 500, ULOG_PACKET, 0, 0, 0), [], 1),  # longer than the datagram
        (packet_msg(None), [], 1),  # a packet without payload (copy mode none)
        (nlmsg(ULOG_CONFIG, b"\0" * 4), [], 1),  # not a packet message
        (nlmsg(ULOG_PACKET, b"\0\0"), [], 2),  # too short for nfgenmsg: bad and no payload
        (packet_msg(SYN) + packet_msg(SYN)[:-3], [SYN], 1),  # second message truncated
    ],
)
def test_parse_counts_malformed_parts(data: bytes, payloads: list[bytes], errors: int) -> None:
    assert parse_nflog(data) == (payloads, errors)


def test_attribute_overrunning_its_message_stops_that_message_only() -> None:
    good = packet_msg(SYN, seq=5)
    bad_body = struct.pack("!BBH", 2, 0, 1) + struct.pack("=HH", 200, 9) + SYN
    data = nlmsg(ULOG_PACKET, bad_body) + good
    batch = parse_nflog_batch(data)
    assert batch.payloads == [SYN]
    assert batch.errors == 2  # the bad attribute, and the message then having no payload
    assert batch.first_seq == batch.last_seq == 5


@FUZZ
@given(st.binary(max_size=600))
def test_parse_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    payloads, errors = parse_nflog(data)
    assert errors >= 0
    assert all(p in data for p in payloads)


@FUZZ
@given(
    st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=6),
    st.integers(0, (1 << 32) - 1),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 10_000),
)
def test_parse_never_raises_on_mutated_batches(
    payloads: list[bytes], first_seq: int, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(batch_of(payloads, first_seq))
    for position, value in flips:
        data[position % len(data)] = value
    mutated = bytes(data[: max(0, len(data) - cut % 40)])
    batch = parse_nflog_batch(mutated)
    assert batch.errors >= 0
    assert all(p in mutated for p in batch.payloads)
    assert (batch.first_seq is None) == (batch.last_seq is None)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=8),
       st.integers(0, (1 << 32) - 1))
def test_parse_roundtrips_well_formed_batches(payloads: list[bytes], first_seq: int) -> None:
    batch = parse_nflog_batch(batch_of(payloads, first_seq))
    assert batch.payloads == payloads
    assert batch.errors == 0
    assert batch.first_seq == first_seq
    assert batch.last_seq == (first_seq + len(payloads) - 1) % (1 << 32)


# -- config requests as bytes --------------------------------------------------------------------


def test_bind_request_bytes() -> None:
    msg = config_message(7373, 1, bind_attributes())
    assert msg == (struct.pack("=IHHII", 28, ULOG_CONFIG, 0x5, 1, 0)
                   + bytes([0, 0]) + (7373).to_bytes(2, "big")
                   + struct.pack("=HH", 5, 1) + b"\x01\0\0\0")


def test_mode_request_bytes() -> None:
    attrs = mode_attributes(copy_range=256, qthresh=64, flush_cs=1, nlbufsiz=65536)
    assert attrs == (
        struct.pack("=HH", 10, 2) + struct.pack("!IBB", 256, 2, 0) + b"\0\0"  # COPY_PACKET
        + struct.pack("=HH", 8, 3) + struct.pack("!I", 65536)
        + struct.pack("=HH", 8, 4) + struct.pack("!I", 1)
        + struct.pack("=HH", 8, 5) + struct.pack("!I", 64)
        + struct.pack("=HH", 6, 6) + struct.pack("!H", 1) + b"\0\0"  # flags: NFULNL_CFG_F_SEQ
    )


def test_ack_errno_matches_only_its_own_sequence_number() -> None:
    assert ack_errno(ack(3), 3) == 0
    assert ack_errno(ack(3, errno.EPERM), 3) == errno.EPERM
    assert ack_errno(ack(2, errno.EPERM), 3) is None
    assert ack_errno(packet_msg(SYN) + ack(3, errno.EBUSY), 3) == errno.EBUSY
    assert ack_errno(b"\xff" * 7, 3) is None


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 100))
def test_ack_errno_never_raises(data: bytes, seq: int) -> None:
    ack_errno(data, seq)


# -- NflogCapture over a fake socket ---------------------------------------------------------------


class FakeNetlink:
    """Answers config requests from `answers` (errno per request, 0 = ack) and then hands out the
    queued datagrams or exceptions, one per recv."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers if answers is not None else [0, 0])
        self.sent: list[bytes] = []
        self.queue: list[bytes | OSError] = []
        self.options: dict[tuple[int, int], int] = {}
        self.blocking: bool | None = None
        self.closed = False

    def bind(self, address: tuple[int, int]) -> None:
        assert address == (0, 0)

    def setsockopt(self, level: int, name: int, value: int) -> None:
        self.options[level, name] = value

    def settimeout(self, timeout: float) -> None:
        self.blocking = True

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        seq = struct.unpack_from("=I", data, 8)[0]
        self.queue.append(ack(seq, self.answers.pop(0)))
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.queue:
            if self.blocking:
                raise TimeoutError
            raise BlockingIOError
        item = self.queue.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


def capture_with(fake: FakeNetlink, **kw: Any) -> NflogCapture:
    return NflogCapture(7373, socket_factory=lambda: fake, **kw)  # type: ignore[arg-type,return-value]


def test_capture_binds_then_configures_copy_range_batching_and_sequence_numbers() -> None:
    fake = FakeNetlink()
    capture = capture_with(fake)
    assert fake.sent == [
        config_message(7373, 1, bind_attributes()),
        config_message(7373, 2, mode_attributes(256, 1, 1, 65536)),
    ]
    assert fake.options[socket.SOL_SOCKET, 33] == 4 << 20  # SO_RCVBUFFORCE
    assert fake.blocking is False
    assert capture.fileno() == 99
    capture.close()
    assert fake.closed


def test_read_batch_returns_whole_kernel_batches_and_counts_sequence_gaps() -> None:
    fake = FakeNetlink()
    capture = capture_with(fake)
    fake.queue += [batch_of([SYN] * 3, first_seq=0), batch_of([SYN] * 2, first_seq=10)]
    assert capture.read_batch() == [SYN] * 5
    assert capture.read_batch() == []
    assert capture.stats() == CaptureStats(packets=12, drops=7)  # seq 3..9 never arrived
    assert capture.drops() == 7


def test_read_batch_stops_after_limit_without_splitting_a_kernel_batch() -> None:
    fake = FakeNetlink()
    capture = capture_with(fake)
    fake.queue += [batch_of([SYN] * 3, 0), batch_of([SYN] * 3, 3), batch_of([SYN] * 3, 6)]
    assert len(capture.read_batch(limit=4)) == 6
    assert len(capture.read_batch(limit=4)) == 3
    assert capture.drops() == 0


def test_enobufs_counts_as_a_drop_until_the_next_batch_says_how_many() -> None:
    fake = FakeNetlink()
    capture = capture_with(fake)
    fake.queue += [batch_of([SYN], 0), OSError(errno.ENOBUFS, "No buffer space")]
    assert capture.read_batch() == [SYN]
    assert (capture.drops(), capture.overruns) == (1, 1)
    fake.queue.append(batch_of([SYN], 65))
    capture.read_batch()
    assert capture.drops() == 64


def test_sequence_wraps_without_a_gap() -> None:
    fake = FakeNetlink()
    capture = capture_with(fake)
    fake.queue += [batch_of([SYN] * 2, (1 << 32) - 2), batch_of([SYN], 0)]
    assert len(capture.read_batch()) == 3
    assert capture.drops() == 0


def test_malformed_datagrams_are_counted_not_raised() -> None:
    fake = FakeNetlink()
    capture = capture_with(fake)
    fake.queue += [b"\x00" * 5, packet_msg(SYN, 0)]
    assert capture.read_batch() == [SYN]
    assert capture.malformed == 1


def test_other_receive_errors_propagate() -> None:
    fake = FakeNetlink()
    capture = capture_with(fake)
    fake.queue.append(OSError(errno.EBADF, "bad"))
    with pytest.raises(OSError):
        capture.read_batch()


@pytest.mark.parametrize("code", [errno.EPERM, errno.EBUSY])
def test_group_in_use_names_the_config_key(code: int) -> None:
    fake = FakeNetlink([code])
    with pytest.raises(NflogGroupTaken, match=r"NFLOG group 7373 is already in use.*NFLOG_GROUP"):
        capture_with(fake)
    assert fake.closed


def test_other_config_failures_are_capture_errors() -> None:
    fake = FakeNetlink([0, errno.EINVAL])
    with pytest.raises(CaptureError, match="configure failed: Invalid argument") as info:
        capture_with(fake)
    assert not isinstance(info.value, NflogGroupTaken)
    assert fake.closed


def test_no_answer_is_a_capture_error() -> None:
    fake = FakeNetlink()
    fake.send = lambda data: len(data)  # type: ignore[method-assign]
    with pytest.raises(CaptureError, match="no answer to bind"):
        capture_with(fake)


def test_packets_arriving_before_the_ack_are_counted() -> None:
    fake = FakeNetlink()
    original_send = fake.send

    def send(data: bytes) -> int:
        fake.queue.append(batch_of([SYN], 0))
        return original_send(data)

    fake.send = send  # type: ignore[method-assign]
    capture = capture_with(fake)
    assert capture.stats().packets == 2


def test_an_ack_for_another_request_is_not_taken_for_ours() -> None:
    fake = FakeNetlink()
    original_send = fake.send

    def send(data: bytes) -> int:
        fake.queue.append(ack(99, errno.EPERM))  # a stray answer, not to this request
        return original_send(data)

    fake.send = send  # type: ignore[method-assign]
    capture = capture_with(fake)
    assert len(fake.sent) == 2
    assert capture.malformed == 2  # each stray answer was handed to the packet parser


def test_socket_open_failure_is_a_capture_error() -> None:
    def refuse() -> socket.socket:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    with pytest.raises(CaptureError, match="cannot open an nfnetlink_log socket"):
        NflogCapture(1, socket_factory=refuse)


@pytest.mark.parametrize("group", [-1, 65536, True])
def test_group_out_of_range(group: int) -> None:
    with pytest.raises(ValueError, match="not between 0 and 65535"):
        NflogCapture(group, socket_factory=lambda: pytest.fail("opened"))


# -- nftables capture rules (golden nft text) -------------------------------------------------------

BOTH = {Protocol.TCP, Protocol.UDP}
CAPTURE_HEAD = (
    "add table inet portsentry\n"
    "add chain inet portsentry capture\n"
    "flush chain inet portsentry capture\n"
    "delete chain inet portsentry capture\n"
    "add chain inet portsentry capture { type filter hook input priority -9; policy accept; }\n"
)
COUNT_HEAD = (
    "add chain inet portsentry count\n"
    "flush chain inet portsentry count\n"
    "delete chain inet portsentry count\n"
    "add chain inet portsentry count { type filter hook input priority -11; policy accept; }\n"
)
COUNT_RULE = "add rule inet portsentry count meta pkttype host"
TCP_RULE = "add rule inet portsentry capture meta pkttype host tcp flags & (ack | rst) == 0"
UDP_RULE = "add rule inet portsentry capture meta pkttype host"
NEW_FLOWS = "ct state != { established, related }"


def nft(recorder: Recorder, **kw: Any) -> NftablesBackend:
    return NftablesBackend(runner=recorder, mechanism="cli", **kw)


def test_capture_rules_for_advanced_modes_bound_the_port() -> None:
    rec = Recorder()
    nft(rec).capture_rules(7373, 1024, BOTH)
    assert rec.calls == [(["nft", "-f", "-"], CAPTURE_HEAD
                          + f"{TCP_RULE} tcp dport < 1024 log group 7373\n"
                          + f"{UDP_RULE} udp dport < 1024 {NEW_FLOWS} log group 7373\n"
                          # Probes of banned sources, which the filter chain drops first, are counted.
                          + COUNT_HEAD
                          + f"{COUNT_RULE} tcp flags & (ack | rst) == 0 tcp dport < 1024 ip saddr @blocked4 "
                            "update @dropped4 { ip saddr counter }\n"
                          + f"{COUNT_RULE} udp dport < 1024 {NEW_FLOWS} ip saddr @blocked4 "
                            "update @dropped4 { ip saddr counter }\n"
                          + f"{COUNT_RULE} tcp flags & (ack | rst) == 0 tcp dport < 1024 ip6 saddr @blocked6 "
                            "update @dropped6 { ip6 saddr counter }\n"
                          + f"{COUNT_RULE} udp dport < 1024 {NEW_FLOWS} ip6 saddr @blocked6 "
                            "update @dropped6 { ip6 saddr counter }\n")]


def test_capture_rules_without_a_bound_match_every_port() -> None:
    rec = Recorder()
    nft(rec).capture_rules(0, None, BOTH)
    script = rec.calls[0][1]
    assert script is not None
    assert script.startswith(CAPTURE_HEAD + f"{TCP_RULE} log group 0\n"
                             + f"{UDP_RULE} meta l4proto udp {NEW_FLOWS} log group 0\n" + COUNT_HEAD)
    assert f"{COUNT_RULE} tcp flags & (ack | rst) == 0 ip saddr @blocked4 update @dropped4" in script
    assert CaptureSpec.of(0, 65536, BOTH).max_port is None


def test_capture_rules_follow_the_table_and_priority_and_protocols() -> None:
    rec = Recorder()
    nft(rec, table="ps2", priority=-150).capture_rules(9, 40, {Protocol.UDP})
    script = rec.calls[0][1]
    assert script is not None
    assert "add chain inet ps2 capture { type filter hook input priority -149; policy accept; }\n" in script
    assert ("add rule inet ps2 capture meta pkttype host udp dport < 40 "
            "ct state != { established, related } log group 9\n") in script
    assert "add chain inet ps2 count { type filter hook input priority -151; policy accept; }\n" in script
    assert script.endswith("add rule inet ps2 count meta pkttype host udp dport < 40 "
                           "ct state != { established, related } ip6 saddr @blocked6 "
                           "update @dropped6 { ip6 saddr counter }\n")
    assert "tcp" not in script


def test_capture_rules_never_change_what_happens_to_the_packet() -> None:
    for spec in (CaptureSpec.of(1, 1024, BOTH), CaptureSpec.of(1, None, BOTH)):
        for rule in spec.rules():
            assert rule.endswith("log group 1")
            assert not any(word in rule.split() for word in ("drop", "accept", "reject", "counter"))


def test_zero_bound_logs_nothing() -> None:
    assert CaptureSpec.of(1, 0, BOTH).rules() == []


@pytest.mark.parametrize(("group", "max_port"), [(-1, None), (65536, None), (1, -1), (1, 65537)])
def test_capture_spec_refuses_out_of_range(group: int, max_port: int | None) -> None:
    with pytest.raises(ValueError):
        CaptureSpec.of(group, max_port, BOTH)


def chain_json(group: int, rules: int) -> str:
    objects: list[dict[str, Any]] = [{"chain": {"family": "inet", "table": "portsentry",
                                                 "name": "capture", "hook": "input", "prio": -9}}]
    for handle in range(rules):
        objects.append({"rule": {"chain": "capture", "handle": handle, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "pkttype"}}, "right": "host"}},
            {"log": {"group": group}}]}})
    return json.dumps({"nftables": objects})


LIST_CAPTURE = ["nft", "-j", "list", "chain", "inet", "portsentry", "capture"]
LIST_COUNT = ["nft", "-j", "list", "chain", "inet", "portsentry", "count"]


def count_json(rules: int) -> str:
    objects: list[dict[str, Any]] = [{"chain": {"family": "inet", "table": "portsentry", "name": "count"}}]
    objects += [{"rule": {"chain": "count", "handle": handle, "expr": [
        {"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "saddr"}},
                 "set": "@dropped4", "stmt": [{"counter": None}]}}]}} for handle in range(rules)]
    return json.dumps({"nftables": objects})

LIST_FILTER = ["nft", "-j", "list", "chain", "inet", "portsentry", "filter"]
EMPTY_FILTER = json.dumps({"nftables": [{"chain": {"name": "filter"}}]})


def test_repair_does_nothing_while_the_rules_are_there() -> None:
    rec = Recorder({tuple(LIST_CAPTURE): RunResult(0, chain_json(7373, 2), ""),
                    tuple(LIST_COUNT): RunResult(0, count_json(4), "")})
    backend = nft(rec)
    assert backend.repair_capture() is False  # nothing installed yet: nothing to check
    assert rec.calls == []
    backend.capture_rules(7373, 1024, BOTH)
    assert backend.capture_intact()
    assert backend.repair_capture() is False
    assert rec.argvs[1:] == [LIST_CAPTURE, LIST_COUNT, LIST_CAPTURE, LIST_COUNT]


@pytest.mark.parametrize("listing", [
    RunResult(1, "", "Error: No such file or directory"),  # nft flush ruleset: table gone
    RunResult(0, chain_json(7373, 0), ""),  # chain flushed
    RunResult(0, chain_json(7374, 2), ""),  # someone else's group
    RunResult(0, chain_json(7373, 1), ""),  # a rule deleted
    RunResult(0, "not json", ""),
])
def test_repair_recreates_table_and_rules_when_they_are_gone(listing: RunResult) -> None:
    rec = Recorder({tuple(LIST_CAPTURE): listing, tuple(LIST_FILTER): RunResult(0, EMPTY_FILTER, ""),
                    tuple(LIST_COUNT): RunResult(0, count_json(4), "")})
    backend = nft(rec)
    backend.capture_rules(7373, 1024, BOTH)
    install = rec.calls[0]
    rec.calls.clear()
    assert backend.repair_capture() is True
    assert rec.argvs[0] == LIST_CAPTURE
    setup = rec.argvs.index(["nft", "-f", "-"])  # then the drop rules, after a look at the chain
    assert rec.argvs[setup:setup + 3] == [["nft", "-f", "-"], LIST_FILTER, ["nft", "-f", "-"]]
    assert rec.calls[-1] == install


@pytest.mark.parametrize("listing", [
    RunResult(1, "", "Error: No such file or directory"),  # someone deleted only the count chain
    RunResult(0, count_json(3), ""),  # a counting rule deleted
])
def test_repair_recreates_the_count_chain_too(listing: RunResult) -> None:
    rec = Recorder({tuple(LIST_CAPTURE): RunResult(0, chain_json(7373, 2), ""), tuple(LIST_COUNT): listing,
                    tuple(LIST_FILTER): RunResult(0, EMPTY_FILTER, "")})
    backend = nft(rec)
    backend.capture_rules(7373, 1024, BOTH)
    install = rec.calls[0]
    assert backend.capture_intact() is False
    assert backend.repair_capture() is True
    assert rec.calls[-1] == install


def test_teardown_and_drop_capture_stop_repairs() -> None:
    tables = json.dumps({"nftables": [{"table": {"family": "inet", "name": "portsentry"}}]})
    rec = Recorder({("nft", "-j", "list", "tables"): RunResult(0, tables, ""),
                    tuple(LIST_CAPTURE): RunResult(1, "", "gone")})
    backend = nft(rec)
    backend.capture_rules(7373, None, BOTH)
    backend.teardown()
    assert ["nft", "delete", "table", "inet", "portsentry"] in rec.argvs
    assert backend.repair_capture() is False
    backend.capture_rules(7373, None, BOTH)
    rec.calls.clear()
    backend.drop_capture()
    assert rec.calls == [(["nft", "-f", "-"], "add chain inet portsentry capture\n"
                          "flush chain inet portsentry capture\n"
                          "delete chain inet portsentry capture\n"
                          "add chain inet portsentry count\n"
                          "flush chain inet portsentry count\n"
                          "delete chain inet portsentry count\n")]
    assert backend.repair_capture() is False


# -- config keys ------------------------------------------------------------------------------------


def test_capture_keys_default_and_parse() -> None:
    default = parse_config("", "p.conf").config
    assert (default.capture, default.nflog_group) == ("auto", 7373)
    config = parse_config('CAPTURE="nflog"\nNFLOG_GROUP="0"\n', "p.conf").config
    assert (config.capture, config.nflog_group) == ("nflog", 0)


@pytest.mark.parametrize(("text", "message"), [
    ('CAPTURE="ring"\n', "p.conf:1: CAPTURE: 'ring' is not one of auto, nflog, packet"),
    ('\nNFLOG_GROUP="65536"\n', "p.conf:2: NFLOG_GROUP: '65536' is not a log group from 0 to 65535"),
])
def test_capture_keys_refuse_bad_values(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "p.conf")
    assert str(info.value) == message


# -- the factory's choice ---------------------------------------------------------------------------


class FakeBackend(NftablesBackend):
    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__(runner=Recorder(), mechanism="cli")
        self.installed: list[tuple[int, int | None, set[Protocol]]] = []
        self.drops = 0  # drop_capture calls
        self.fail = fail

    def capture_rules(self, group: int, max_port: int | None, protocols: Any,
                      quiet_udp_ports: Any = (), kernel: Any = None) -> None:
        if self.fail is not None:
            raise self.fail
        self.installed.append((group, max_port, set(protocols)))

    def drop_capture(self) -> None:
        self.drops += 1


class Opened:
    before_nat = False

    def __init__(self, kind: str, *args: object) -> None:
        self.kind, self.args = kind, args
        self.closed = False

    def live_ports(self, live: dict[Protocol, frozenset[int]]) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Opened]:
    made: list[Opened] = []

    def packet(max_port: int | None, protocols: set[Protocol]) -> Opened:
        made.append(Opened("packet", max_port, protocols))
        return made[-1]

    def nflog(group: int, quieter: object = None, on_live: object = None) -> Opened:
        made.append(Opened("nflog", group))
        return made[-1]

    monkeypatch.setattr(factory, "open_packet_capture", packet)
    monkeypatch.setattr(factory, "NflogCapture", nflog)
    return made


def open_with(config: Config, backend: Any, log: Callable[[str], None] = lambda _: None) -> object:
    return factory.capture_factory(config, backend, log)(1024, {Protocol.TCP})


CONFIG = parse_config('NFLOG_GROUP="42"\n', "p.conf").config


def test_auto_with_nftables_uses_nflog_and_installs_the_rules(opened: list[Opened]) -> None:
    backend = FakeBackend()
    capture = open_with(CONFIG, backend)
    assert [(o.kind, o.args) for o in opened] == [("nflog", (42,))]
    assert capture is opened[0]
    assert backend.installed == [(42, 1024, {Protocol.TCP})]


def test_auto_without_nftables_uses_af_packet(opened: list[Opened]) -> None:
    open_with(CONFIG, None)
    assert [o.kind for o in opened] == ["packet"]


def test_packet_with_nftables_removes_old_rules(opened: list[Opened]) -> None:
    backend = FakeBackend()
    open_with(replace(CONFIG, capture="packet"), backend)
    assert [o.kind for o in opened] == ["packet"]
    assert backend.drops == 1 and backend.installed == []


def test_nflog_without_nftables_is_refused_at_open(opened: list[Opened]) -> None:
    config = parse_config('\nCAPTURE="nflog"\n', "p.conf").config
    opener = factory.capture_factory(config, None, lambda _: None)
    with pytest.raises(CaptureError, match=r'^p.conf:2: CAPTURE: nflog needs the nftables ban backend'):
        opener(None, {Protocol.TCP})
    assert opened == []


def group_taken(group: int, quieter: object = None, on_live: object = None) -> Opened:
    raise NflogGroupTaken("NFLOG group 42 is already in use by another program: set NFLOG_GROUP")


def test_auto_falls_back_with_a_warning(opened: list[Opened], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "NflogCapture", group_taken)
    lines: list[str] = []
    open_with(CONFIG, FakeBackend(), lines.append)
    assert [o.kind for o in opened] == ["packet"]
    assert len(lines) == 1 and lines[0].startswith("adminalert: WARNING: NFLOG capture unavailable")


def test_explicit_nflog_fails_naming_the_group_key(opened: list[Opened],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "NflogCapture", group_taken)
    config = parse_config('CAPTURE="nflog"\nNFLOG_GROUP="42"\n', "p.conf").config
    with pytest.raises(CaptureError, match=r"^p.conf:2: NFLOG_GROUP: NFLOG group 42 is already"):
        open_with(config, FakeBackend())


def test_rule_failure_closes_the_socket(opened: list[Opened]) -> None:
    from portsentry.responders.backend import BackendError

    config = parse_config('CAPTURE="nflog"\n', "p.conf").config
    with pytest.raises(CaptureError, match=r"^p.conf:1: CAPTURE: cannot add the NFLOG rules: nope"):
        open_with(config, FakeBackend(BackendError("nope")))
    assert opened[0].kind == "nflog" and opened[0].closed
    lines: list[str] = []
    open_with(CONFIG, FakeBackend(BackendError("nope")), lines.append)
    assert [o.kind for o in opened] == ["nflog", "nflog", "packet"]
    assert opened[1].closed and lines


def test_build_sensors_hands_the_choice_to_the_stealth_sensor(opened: list[Opened]) -> None:
    config = parse_config('TCP_PORTS="1,2"\n', "p.conf").config
    backend = FakeBackend()
    (sensor,) = factory.build_sensors(config, [Mode.STCP], lambda _: None, lambda: 0.0, backend)
    handles: list[object] = list(sensor.open())
    assert handles == [opened[0]]
    assert opened[0].kind == "nflog"
    assert backend.installed == [(7373, 3, {Protocol.TCP})]
    sensor.close()
    assert opened[0].closed


def test_capture_rules_keep_udp_services_traffic_away() -> None:
    rec = Recorder()
    nft(rec).capture_rules(7373, 1024, BOTH, quiet_udp_ports=[514, 53])
    assert rec.calls[0][1] is not None
    assert (f"{UDP_RULE} udp dport < 1024 udp dport != {{ 53, 514 }} {NEW_FLOWS} log group 7373\n"
            in rec.calls[0][1])


def test_repair_after_a_flushed_ruleset_puts_the_guards_and_kernel_ports_back_first() -> None:
    """`nft flush ruleset` empties the first-probe ban's sets with everything else. The repair made
    them again empty and the daemon, whose guards had not changed, never pushed them again: the
    rebuilt ban rules then spared none of this host's own, ignored or gateway addresses (and
    banned nothing until a service started or stopped and refilled the ports)."""
    from ipaddress import ip_address, ip_network

    from portsentry.responders.nft_capture import KernelBan

    rec = Recorder({tuple(LIST_CAPTURE): RunResult(1, "", "Error: No such file or directory"),
                    tuple(LIST_FILTER): RunResult(0, EMPTY_FILTER, ""),
                    tuple(LIST_COUNT): RunResult(0, count_json(2), "")})
    backend = nft(rec)
    backend.capture_rules(7373, 1024, BOTH, kernel=KernelBan(frozenset(BOTH), 3600))
    backend.set_guards([ip_network("198.18.9.0/24")], [ip_address("198.18.0.1")])
    backend.set_kernel_ports({Protocol.TCP: [79], Protocol.UDP: [161]})
    guards, ports = rec.calls[-2], rec.calls[-1]
    rec.calls.clear()
    assert backend.repair_capture() is True
    scripts = [call for call in rec.calls if call[0] == ["nft", "-f", "-"]]
    # The capture chain as installed (the ban slots, if any, kept: capture_script's `previous`).
    assert backend._capture is not None
    capture = (["nft", "-f", "-"], backend.capture_script(backend._capture, backend._capture))
    assert guards in scripts and ports in scripts and capture in scripts
    # Before the ban rules come back: no moment with ban rules and empty guards.
    assert scripts.index(guards) < scripts.index(capture)
    assert scripts.index(ports) < scripts.index(capture)


def test_an_unblock_looks_for_unsettled_catches_only_where_the_kernel_may_have_caught() -> None:
    """Forgetting an unblocked source's caught entries costs two `nft -j list` runs: not spent
    when this process installed a capture without the first-probe ban and has read the caught
    sets settled (the daemon's first settling round), spent when it bans in the kernel and when
    it knows no capture (an admin command)."""
    from ipaddress import ip_address

    from portsentry.responders.nft_capture import KernelBan

    source = ip_address("198.18.0.2")
    listings = []
    empty = RunResult(0, '{"nftables": [{"metainfo": {}}, {"set": {"name": "caught4"}}]}', "")
    for kernel in (None, KernelBan(frozenset(BOTH), 3600), "unknown"):
        rec = Recorder({("nft", "-j", "list", "set"): empty})
        backend = nft(rec)
        if kernel != "unknown":
            backend.capture_rules(7373, 1024, BOTH, kernel=kernel)  # type: ignore[arg-type]
            assert backend.caught() == []  # what a run before may have left: nothing
        rec.calls.clear()
        backend.forget_caught([source])
        listings.append(sum(1 for call in rec.calls if call[0][:3] == ["nft", "-j", "list"]))
    assert listings == [0, 2, 2]
