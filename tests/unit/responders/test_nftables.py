"""Golden tests for the nftables backend: the exact nft scripts and argv it runs, the exact netlink
bytes it sends, and how it reads answers (acks, errors, JSON listings); no root needed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.core.probe import Protocol
from portsentry.responders import nftables
from portsentry.responders.backend import BackendError, RunResult
from portsentry.responders.nft_elements import (
    KERNEL_TIMEOUT_LIMIT,
    NFT_MSG_DELSETELEM,
    NFT_MSG_NEWSETELEM,
    ElementOp,
    InconsistentListing,
    batch,
    element_attribute,
    element_message,
    parse_acks,
    parse_set_json,
    timeout_text,
)
from portsentry.responders.nftables import NftablesBackend
from tests.unit.responders.test_backend import Recorder

# Modest by default; PORTSENTRY_FUZZ_EXAMPLES raises it for long fuzz runs.
FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "100")), deadline=None)

V4 = ip_address("198.18.0.9")
V6 = ip_address("fd00::9")
SETUP = (
    "add table inet portsentry\n"
    "add set inet portsentry blocked4 { type ipv4_addr; flags timeout; size 262144; }\n"
    "add set inet portsentry blocked6 { type ipv6_addr; flags timeout; size 262144; }\n"
    "add set inet portsentry protect4 { type ipv4_addr; flags interval; }\n"
    "add set inet portsentry protect6 { type ipv6_addr; flags interval; }\n"
    "add set inet portsentry nokernel4 { type ipv4_addr; flags interval; }\n"
    "add set inet portsentry nokernel6 { type ipv6_addr; flags interval; }\n"
    "add set inet portsentry kports_tcp { type inet_service; flags interval; }\n"
    "add set inet portsentry kports_udp { type inet_service; flags interval; }\n"
    "add set inet portsentry caught4 { type ipv4_addr . inet_proto . inet_service; flags timeout; "
    "size 262144; }\n"
    "add set inet portsentry caught6 { type ipv6_addr . inet_proto . inet_service; flags timeout; "
    "size 262144; }\n"
    "add set inet portsentry dropped4 { type ipv4_addr; flags dynamic, timeout; timeout 3600s; "
    "size 262144; }\n"
    "add set inet portsentry dropped6 { type ipv6_addr; flags dynamic, timeout; timeout 3600s; "
    "size 262144; }\n"
    "add chain inet portsentry filter { type filter hook input priority -10; policy accept; }\n"
)
RULES = (
    "add rule inet portsentry filter ip saddr @blocked4 counter drop\n"
    "add rule inet portsentry filter ip6 saddr @blocked6 counter drop\n"
)
EMPTY_CHAIN = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    {"chain": {"family": "inet", "table": "portsentry", "name": "filter", "handle": 3}},
]})
FULL_CHAIN = json.dumps({"nftables": [
    {"chain": {"family": "inet", "table": "portsentry", "name": "filter", "handle": 3}},
    {"rule": {"family": "inet", "table": "portsentry", "chain": "filter", "handle": 4, "expr": []}},
]})
# Real `nft -j list set` output of nft 1.0.6 (one timed, one permanent element).
SET_JSON = (
    '{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", '
    '"json_schema_version": 1}}, {"set": {"family": "inet", "name": "blocked4", "table": '
    '"portsentry", "type": "ipv4_addr", "handle": 2, "size": 262144, "flags": ["timeout"], '
    '"elem": [{"elem": {"val": "198.18.5.5", "timeout": 60, "expires": 59}}, "198.18.5.6"]}}]}'
)
EMPTY_SET6 = json.dumps({"nftables": [{"set": {"family": "inet", "name": "blocked6",
                                               "table": "portsentry", "type": "ipv6_addr"}}]})


def cli(recorder: Recorder, **kw: object) -> NftablesBackend:
    return NftablesBackend(runner=recorder, mechanism="cli", **kw)  # type: ignore[arg-type]


# -- scripts and argv --------------------------------------------------------------------------


def test_setup_creates_table_sets_chain_then_rules_once() -> None:
    rec = Recorder({("nft", "-j", "list", "chain"): RunResult(0, EMPTY_CHAIN, "")})
    cli(rec).setup()
    assert rec.calls == [
        (["nft", "-f", "-"], SETUP),
        (["nft", "-j", "list", "chain", "inet", "portsentry", "filter"], None),
        (["nft", "-f", "-"], RULES),
    ]


def test_setup_again_adds_no_second_pair_of_rules() -> None:
    rec = Recorder({("nft", "-j", "list", "chain"): RunResult(0, FULL_CHAIN, "")})
    cli(rec).setup()
    assert [stdin for _, stdin in rec.calls] == [SETUP, None]


def test_setup_honours_table_hook_priority_size() -> None:
    rec = Recorder({("nft", "-j", "list", "chain"): RunResult(0, FULL_CHAIN, "")})
    cli(rec, table="ps_test", hook="prerouting", priority=-300, set_size=1000).setup()
    script = rec.calls[0][1]
    assert script is not None
    assert "add table inet ps_test\n" in script
    assert "size 1000;" in script
    assert "type filter hook prerouting priority -300; policy accept;" in script
    assert rec.argvs[1] == ["nft", "-j", "list", "chain", "inet", "ps_test", "filter"]


def test_cli_add_is_one_atomic_refreshing_transaction() -> None:
    rec = Recorder()
    cli(rec).add(V4, 3600)
    assert rec.calls == [(["nft", "-f", "-"],
        "add element inet portsentry blocked4 { 198.18.0.9 }\n"
        "delete element inet portsentry blocked4 { 198.18.0.9 }\n"
        "add element inet portsentry blocked4 { 198.18.0.9 timeout 3600s }\n")]


def test_cli_add_ipv6_forever() -> None:
    rec = Recorder()
    cli(rec).add(V6, None)
    assert rec.calls[0][1] == (
        "add element inet portsentry blocked6 { fd00::9 }\n"
        "delete element inet portsentry blocked6 { fd00::9 }\n"
        "add element inet portsentry blocked6 { fd00::9 }\n")


def test_cli_remove_tolerates_absent_address() -> None:
    rec = Recorder()
    cli(rec).remove(V4)
    assert rec.calls == [(["nft", "-f", "-"],
        "add element inet portsentry blocked4 { 198.18.0.9 }\n"
        "delete element inet portsentry blocked4 { 198.18.0.9 }\n")]


def test_cli_add_many_groups_by_family_and_dedups() -> None:
    rec = Recorder()
    cli(rec).add_many([(V4, 10), (V6, 1.5), (ip_address("198.18.0.10"), None), (V4, 20)])
    assert rec.calls == [(["nft", "-f", "-"],
        "add element inet portsentry blocked4 { 198.18.0.9, 198.18.0.10 }\n"
        "delete element inet portsentry blocked4 { 198.18.0.9, 198.18.0.10 }\n"
        "add element inet portsentry blocked4 { 198.18.0.9 timeout 20s, 198.18.0.10 }\n"
        "add element inet portsentry blocked6 { fd00::9 }\n"
        "delete element inet portsentry blocked6 { fd00::9 }\n"
        "add element inet portsentry blocked6 { fd00::9 timeout 1500ms }\n")]


def test_add_many_nothing_runs_nothing() -> None:
    rec = Recorder()
    cli(rec).add_many([])
    assert rec.calls == []


def test_teardown_deletes_only_our_table_when_present() -> None:
    tables = json.dumps({"nftables": [
        {"table": {"family": "inet", "name": "other", "handle": 1}},
        {"table": {"family": "inet", "name": "portsentry", "handle": 2}},
    ]})
    rec = Recorder({("nft", "-j", "list", "tables"): RunResult(0, tables, "")})
    assert cli(rec).teardown() == "table inet portsentry"
    assert rec.argvs == [["nft", "-j", "list", "tables", "inet"],
                         ["nft", "delete", "table", "inet", "portsentry"]]


def test_teardown_without_our_table_deletes_nothing() -> None:
    tables = json.dumps({"nftables": [{"table": {"family": "inet", "name": "filter"}}]})
    rec = Recorder({("nft", "-j", "list", "tables"): RunResult(0, tables, "")})
    # Nothing removed is said as such: `portsentry flush` told "removed" of a table not there.
    assert cli(rec).teardown() is None
    assert rec.argvs == [["nft", "-j", "list", "tables", "inet"]]


def test_members_reads_both_sets() -> None:
    rec = Recorder({
        ("nft", "-j", "list", "set", "inet", "portsentry", "blocked4"): RunResult(0, SET_JSON, ""),
        ("nft", "-j", "list", "set", "inet", "portsentry", "blocked6"): RunResult(0, EMPTY_SET6, ""),
    })
    assert cli(rec).members() == {ip_address("198.18.5.5"): 59.0, ip_address("198.18.5.6"): None}


def test_members_retries_a_listing_taken_during_a_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftables, "LISTING_RETRY_DELAY", 0)
    dup = json.dumps({"nftables": [{"set": {"elem": ["198.18.0.1", "198.18.0.1"]}}]})
    answers = iter([dup, dup, SET_JSON, EMPTY_SET6])
    rec = Recorder({("nft",): lambda argv, stdin: RunResult(0, next(answers), "")})
    assert len(cli(rec).members()) == 2
    assert len(rec.calls) == 4


def test_parse_set_json_rejects_garbage() -> None:
    with pytest.raises(BackendError, match="unexpected output"):
        parse_set_json("Error: No such file or directory")
    with pytest.raises(BackendError, match="not an address"):
        parse_set_json(json.dumps({"nftables": [{"set": {"elem": ["; flush ruleset"]}}]}))
    with pytest.raises(InconsistentListing):
        parse_set_json(json.dumps({"nftables": [{"set": {"elem": ["fd00::1", "fd00:0::1"]}}]}))


@pytest.mark.parametrize(("seconds", "text"), [
    (3600, "3600s"), (1, "1s"), (1.5, "1500ms"), (0.0001, "1ms"), (2.0004, "2001ms"),
])
def test_timeout_text(seconds: float, text: str) -> None:
    assert timeout_text(seconds) == text


@pytest.mark.parametrize("bad", ["198.18.0.9", "198.18.0.9 } ; flush ruleset ; {", 3323068425])
def test_only_address_objects_reach_any_command(bad: object) -> None:
    rec = Recorder()
    backend = cli(rec)
    with pytest.raises(TypeError):
        backend.add(bad, 60)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.remove(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        backend.add_many([(V4, 60), (bad, 60)])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        op = ElementOp(NFT_MSG_NEWSETELEM, "blocked4", ((bad, None),))  # type: ignore[arg-type]
        element_message("portsentry", op, 1)
    assert rec.calls == []


@pytest.mark.parametrize("kw", [
    {"table": "port sentry"}, {"table": "x;y"}, {"table": ""}, {"hook": "output"},
    {"priority": "-10"}, {"set_size": 0}, {"mechanism": "ioctl"},
])
def test_constructor_refuses_bad_options(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        NftablesBackend(**kw)  # type: ignore[arg-type]


def test_is_supported_probes_nft_and_netlink() -> None:
    rec = Recorder({("nft",): RunResult(1, "", "Operation not permitted")})
    assert not NftablesBackend(runner=rec).is_supported()

    def refuse() -> socket.socket:
        raise PermissionError("no")
    assert not NftablesBackend(runner=Recorder(), socket_factory=refuse).is_supported()
    assert cli(Recorder()).is_supported()


# -- netlink ------------------------------------------------------------------------------------

# NEWSETELEM, flags REQUEST|ACK|CREATE, seq 7, family inet; table "portsentry", set "blocked4",
# one element 198.18.0.9 with timeout 3600000 ms (be64). The kernel accepted exactly these bytes.
GOLDEN_ADD4 = bytes.fromhex(
    "54000000" "0c0a0504" "07000000" "00000000" "01000000"
    "0f000100" "706f7274" "73656e74" "72790000"
    "0d000200" "626c6f63" "6b656434" "00000000"
    "20000380" "1c000180" "0c000180" "08000100" "c6120009" "0c000400" "00000000" "0036ee80"
)
GOLDEN_DEL6 = bytes.fromhex(
    "54000000" "0e0a0500" "08000000" "00000000" "01000000"
    "0f000100" "706f7274" "73656e74" "72790000"
    "0d000200" "626c6f63" "6b656436" "00000000"
    "20000380" "1c000180" "18000180" "14000100" "fd000000" "00000000" "00000000" "00000009"
)
BATCH_BEGIN_1 = bytes.fromhex("14000000" "1000" "0100" "01000000" "00000000" "0000" "000a")


def test_netlink_element_messages_golden() -> None:
    add = ElementOp(NFT_MSG_NEWSETELEM, "blocked4", ((IPv4Address("198.18.0.9"), 3600000),))
    assert element_message("portsentry", add, 7) == GOLDEN_ADD4
    delete = ElementOp(NFT_MSG_DELSETELEM, "blocked6", ((ip_address("fd00::9"), None),))
    assert element_message("portsentry", delete, 8) == GOLDEN_DEL6


def test_netlink_batch_is_framed_by_begin_and_end() -> None:
    data = batch("portsentry", [], 1)
    assert data[:20] == BATCH_BEGIN_1
    assert struct.unpack_from("=IHHII", data, 20) == (20, 17, 1, 2, 0)
    assert data[36:40] == b"\0\0\0\x0a"


class FakeNetlink:
    """Records what is sent and answers every acked message (errno from `fail` by seq offset)."""

    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.sent: list[bytes] = []
        self.fail = fail or {}
        self.pending = b""
        self.closed = False

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)
        offset, index = 0, 0
        while offset < len(data):
            length, _kind, flags, seq, _ = struct.unpack_from("=IHHII", data, offset)
            if flags & 0x4:
                code = self.fail.get(index, 0)
                header = data[offset:offset + 16]
                body = struct.pack("=i", -code) + header
                self.pending += struct.pack("=IHHII", 16 + len(body), 2, 0, seq, 0) + body
                index += 1
            offset += length

    def recv(self, size: int) -> bytes:
        if not self.pending:
            raise BlockingIOError
        data, self.pending = self.pending, b""
        return data

    def settimeout(self, value: float | None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def netlink_backend(fake: FakeNetlink) -> NftablesBackend:
    return NftablesBackend(runner=Recorder(), socket_factory=lambda: fake)  # type: ignore[return-value,arg-type]


def _messages(data: bytes) -> list[tuple[int, int, bytes]]:
    out, offset = [], 0
    while offset < len(data):
        length, kind, flags, _seq, _ = struct.unpack_from("=IHHII", data, offset)
        out.append((kind, flags, data[offset:offset + length]))
        offset += length
    return out


def test_netlink_add_sends_add_delete_add_in_one_batch() -> None:
    fake = FakeNetlink()
    backend = netlink_backend(fake)
    backend.add(V4, 3600)
    assert len(fake.sent) == 1
    kinds = [kind for kind, _, _ in _messages(fake.sent[0])]
    assert kinds == [16, 0x0A0C, 0x0A0E, 0x0A0C, 17]
    last_add = _messages(fake.sent[0])[3][2]
    # Same payload as the golden message apart from the sequence number.
    assert last_add[:8] == GOLDEN_ADD4[:8] and last_add[12:] == GOLDEN_ADD4[12:]
    assert backend.runner.calls == []  # type: ignore[attr-defined]


def test_netlink_remove_sends_add_delete() -> None:
    fake = FakeNetlink()
    netlink_backend(fake).remove(V6)
    messages = _messages(fake.sent[0])
    assert [kind for kind, _, _ in messages] == [16, 0x0A0C, 0x0A0E, 17]
    delete = messages[2][2]
    assert delete[:8] == GOLDEN_DEL6[:8] and delete[12:] == GOLDEN_DEL6[12:]


def test_netlink_remove_many_is_one_transaction_per_chunk_and_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 10.3: unblock --file of 100k addresses made 100k transactions.
    monkeypatch.setattr(nftables, "BATCH_ELEMENTS", 3)
    fake = FakeNetlink()
    addresses = [IPv4Address(0xC6120000 + i) for i in range(5)] + [V6]
    netlink_backend(fake).remove_many(addresses)
    assert len(fake.sent) == 2
    assert [kind for kind, _, _ in _messages(fake.sent[0])] == [16, 0x0A0C, 0x0A0E, 17]
    assert [kind for kind, _, _ in _messages(fake.sent[1])] == [16, 0x0A0C, 0x0A0E, 0x0A0C, 0x0A0E, 17]
    single = FakeNetlink()
    netlink_backend(single).remove(V6)
    assert _messages(single.sent[0])[2][2][12:] == _messages(fake.sent[1])[4][2][12:]  # same delete


def test_cli_remove_many_script() -> None:
    script = NftablesBackend(runner=Recorder()).remove_many_script([IPv4Address("198.18.0.2"), V4])
    assert script == ("add element inet portsentry blocked4 { 198.18.0.2, 198.18.0.9 }\n"
                      "delete element inet portsentry blocked4 { 198.18.0.2, 198.18.0.9 }\n")


def test_netlink_add_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nftables, "BATCH_ELEMENTS", 2)
    fake = FakeNetlink()
    netlink_backend(fake).add_many([(IPv4Address(0xC6120000 + i), 60.0) for i in range(5)])
    assert len(fake.sent) == 3


def test_netlink_kernel_error_is_reported_and_socket_stays_usable() -> None:
    fake = FakeNetlink({0: errno.ENOENT})
    backend = netlink_backend(fake)
    with pytest.raises(BackendError, match="does not exist \\(run setup first\\)"):
        backend.add(V4, 60)
    fake.fail = {2: errno.ENFILE}
    with pytest.raises(BackendError, match="full"):
        backend.add(V4, 60)
    fake.fail = {}
    backend.add(V4, 60)


def test_netlink_missing_answer_is_an_error() -> None:
    class Silent(FakeNetlink):
        def recv(self, size: int) -> bytes:
            raise TimeoutError

    with pytest.raises(BackendError, match="no answer"):
        netlink_backend(Silent()).add(V4, 60)


def test_parse_acks_reads_errors_and_skips_others() -> None:
    ack = struct.pack("=IHHII", 36, 2, 0, 9, 0) + struct.pack("=i", -2) + \
        struct.pack("=IHHII", 84, 0x0A0C, 5, 9, 0)
    other = struct.pack("=IHHII", 20, 3, 0, 1, 0) + b"\0" * 4
    assert parse_acks(other + ack) == [(9, 2)]
    with pytest.raises(ValueError):
        parse_acks(ack[:30])


@pytest.mark.parametrize(("data", "message"), [
    (struct.pack("=IHHII", 20, 2, 0, 1, 0) + b"\0" * 4, "short netlink error message at byte 0"),
    (struct.pack("=IHHII", 20, 3, 0, 1, 0) + b"\0" * 4 + struct.pack("=IHHII", 99, 2, 0, 1, 0),
     "malformed netlink message at byte 20 \\(length 99\\)"),
    (struct.pack("=IHHII", 20, 3, 0, 1, 0) + b"\0" * 9, "5 trailing bytes"),
])
def test_parse_acks_says_where_it_stopped(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_acks(data)
    assert parse_acks(struct.pack("=IHHII", 20, 3, 0, 1, 0) + b"\0" * 7) == []  # padding-sized tail


def test_netlink_answers_to_other_requests_do_not_end_the_wait() -> None:
    fake = FakeNetlink()
    original = fake.sendall

    def sendall(data: bytes) -> None:
        fake.pending += struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -errno.EPERM) + \
            struct.pack("=IHHII", 20, 0x0A0C, 5, 1, 0)  # a stale refusal of seq 1
        original(data)

    fake.sendall = sendall  # type: ignore[method-assign]
    netlink_backend(fake).add(V4, 60)


@FUZZ
@given(st.binary(max_size=300))
def test_parse_acks_fuzz_only_value_errors(data: bytes) -> None:
    try:
        acks = parse_acks(data)
    except ValueError:
        return
    assert all(isinstance(seq, int) and isinstance(code, int) for seq, code in acks)


@FUZZ
@given(st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), max_size=20),
       st.integers(min_value=1, max_value=2**40))
def test_element_message_lengths_are_consistent(addresses: Sequence[IPv4Address],
                                                timeout: int) -> None:
    op = ElementOp(NFT_MSG_NEWSETELEM, "blocked4", tuple((a, timeout) for a in addresses))
    data = element_message("portsentry", op, 1)
    assert struct.unpack_from("=I", data)[0] == len(data)
    assert len(data) % 4 == 0
    for address in addresses:
        assert address.packed in data


@given(st.lists(st.tuples(st.one_of(st.integers(0, 2**32 - 1).map(IPv4Address),
                                    st.integers(0, 2**128 - 1).map(IPv6Address)),
                          st.one_of(st.none(), st.integers(1, 2**40))), max_size=20))
def test_the_fast_element_encoding_is_the_declared_layout(elements):
    op = ElementOp(NFT_MSG_NEWSETELEM, "blocked4", tuple(elements))
    message = element_message("portsentry", op, 7)
    declared = b"".join(element_attribute(address, timeout) for address, timeout in elements)
    assert declared in message and message.endswith(declared)


def test_restore_is_one_timed_add_per_set():
    backend = NftablesBackend(runner=Recorder())
    ops = backend.restore_ops([(IPv4Address("198.18.0.2"), 60.0), (IPv6Address("fd00::2"), None),
                               (IPv4Address("198.18.0.3"), 1.5)])
    assert ops == [ElementOp(NFT_MSG_NEWSETELEM, "blocked4",
                             ((IPv4Address("198.18.0.2"), 60000), (IPv4Address("198.18.0.3"), 1500))),
                   ElementOp(NFT_MSG_NEWSETELEM, "blocked6", ((IPv6Address("fd00::2"), None),))]
    assert backend.restore_script([(IPv4Address("198.18.0.2"), 60.0)]) == \
        "add element inet portsentry blocked4 { 198.18.0.2 timeout 60s }\n"


def test_netlink_restore_sends_one_timed_add_per_set_with_the_declared_bytes() -> None:
    fake = FakeNetlink()
    bans: list[tuple[bytes, float | None]] = [(V4.packed, 3600.0), (V6.packed, None),
                                              (IPv4Address("198.18.0.9").packed, 0.0005)]
    netlink_backend(fake).restore_many(bans)
    assert len(fake.sent) == 2  # one transaction per set
    cases: list[tuple[str, list[tuple[IPv4Address | IPv6Address, int | None]]]] = [
        ("blocked4", [(V4, 3_600_000), (IPv4Address("198.18.0.9"), 1)]),
        ("blocked6", [(V6, None)]),
    ]
    for data, (set_name, expected) in zip(fake.sent, cases, strict=True):
        messages = _messages(data)
        assert [kind for kind, _, _ in messages] == [16, 0x0A0C, 17]
        reference = element_message("portsentry", ElementOp(NFT_MSG_NEWSETELEM, set_name, tuple(expected)), 0)
        sent = messages[1][2]
        assert sent[:8] == reference[:8] and sent[12:] == reference[12:]
    with pytest.raises(ValueError):
        netlink_backend(FakeNetlink()).restore_many([(V4.packed, float("nan"))])
    for bad in (b"198.18.0.2", b"\x00" * 5, "198.18.0.2"):
        with pytest.raises(TypeError):
            netlink_backend(FakeNetlink()).restore_many([(bad, 60.0)])  # type: ignore[list-item]


def test_restore_through_the_sender_thread_sends_every_batch_and_reports_a_refusal() -> None:
    fake = FakeNetlink()
    count = 3 * nftables.BATCH_ELEMENTS + 5
    netlink_backend(fake).restore_many((IPv4Address(0xC6120000 + i).packed, 60.0) for i in range(count))
    sent = [len(_messages(data)) for data in fake.sent]
    assert sent == [3, 3, 3, 3]  # four batches, each BEGIN, one NEWSETELEM, END
    refusing = FakeNetlink(fail={0: errno.ENFILE})
    with pytest.raises(BackendError, match="is full"):
        netlink_backend(refusing).restore_many((IPv4Address(0xC6120000 + i).packed, 60.0) for i in range(10))



def test_kernel_ban_rules_come_after_the_guards_and_before_the_log_rules() -> None:
    from portsentry.responders.nft_capture import CaptureSpec, KernelBan

    kernel = KernelBan(frozenset({Protocol.TCP, Protocol.UDP}), timeout=3600, rate=60)
    rules = CaptureSpec.of(7373, 1024, {Protocol.TCP, Protocol.UDP}, kernel=kernel).rules()
    assert rules[:2] == ["ip saddr @protect4 counter return", "ip6 saddr @protect6 counter return"]
    # A packet some socket takes (a service started since the last refresh of kports) is no probe.
    assert rules[2:4] == ["meta l4proto { tcp, udp } socket transparent 0 counter return",
                          "meta l4proto { tcp, udp } socket transparent 1 counter return"]
    rules = rules[:2] + rules[4:]
    assert rules[2] == (
        "meta pkttype host ip saddr != @nokernel4 tcp flags & (ack | rst) == 0 tcp dport @kports_tcp "
        "add @ban_slots { numgen inc mod 268435456 offset 0 } add @blocked4 { ip saddr timeout 3600s } "
        "add @caught4 { ip saddr . meta l4proto . tcp dport timeout 3600s } log group 7373 drop")
    assert rules[3] == (
        "meta pkttype host ip saddr != @nokernel4 udp dport @kports_udp ct state != { established, related } "
        "add @ban_slots { numgen inc mod 268435456 offset 268435456 } "
        "add @blocked4 { ip saddr timeout 3600s } "
        "add @caught4 { ip saddr . meta l4proto . udp dport timeout 3600s } log group 7373 drop")
    assert rules[4].startswith("meta pkttype host ip6 saddr != @nokernel6 tcp flags")
    assert len(rules) == 8 and rules[6].endswith("log group 7373") and "drop" not in rules[6]
    forever = KernelBan(frozenset({Protocol.TCP}), timeout=None).rules(1)
    assert forever[0].endswith("add @blocked4 { ip saddr } "
                               "add @caught4 { ip saddr . meta l4proto . tcp dport } log group 1 drop")
    assert len(forever) == 2
    assert "protect4" not in " ".join(CaptureSpec.of(7373, 1024, {Protocol.TCP}).rules())
    assert "ban_slots" not in " ".join(forever)  # no cap: no slots
    # Each rule numbers its slots in its own quarter of the range: no two rules' numbers meet.
    offsets = [re.findall(r"offset (\d+)", rule) for rule in rules if "ban_slots" in rule]
    assert offsets == [["0"], ["268435456"], ["536870912"], ["805306368"]]


def test_the_ban_rules_share_one_set_of_slots_kept_while_the_cap_stays() -> None:
    from portsentry.responders.nft_capture import CaptureSpec, KernelBan

    kernel = KernelBan(frozenset({Protocol.TCP, Protocol.UDP}), timeout=3600, rate=60)
    spec = CaptureSpec.of(7373, 1024, {Protocol.TCP, Protocol.UDP}, kernel=kernel)
    script = NftablesBackend().capture_script(spec).splitlines()
    # One set for the four ban rules, made again only after the old chain (its users) is gone.
    made = script.index("add set inet portsentry ban_slots { type mark; size 60; timeout 60s; "
                        "flags dynamic,timeout; }")
    assert script.index("delete chain inet portsentry capture") < script.index(
        "delete set inet portsentry ban_slots") < made < script.index(
        "add chain inet portsentry capture { type filter hook input priority -9; policy accept; }")
    assert sum("add @ban_slots" in line for line in script) == 4
    # The token bucket of older tables goes.
    assert "delete limit inet portsentry ban_rate" in script
    assert not any("limit name" in line for line in script)
    # Quieting a UDP port re-makes the chain: the last minute's slots stay, or a fresh minute of
    # bans would open with every change.
    quieted = CaptureSpec.of(7373, 1024, {Protocol.TCP, Protocol.UDP}, {514}, kernel=kernel)
    again = NftablesBackend().capture_script(quieted, previous=spec)
    assert "delete set inet portsentry ban_slots" not in again
    assert "add set inet portsentry ban_slots { type mark; size 60;" in again
    # A changed cap is a new set (older kernels keep an existing set's size on `add`).
    wider = CaptureSpec.of(7373, 1024, {Protocol.TCP, Protocol.UDP},
                           kernel=KernelBan(frozenset({Protocol.TCP, Protocol.UDP}), timeout=3600, rate=90))
    changed = NftablesBackend().capture_script(wider, previous=spec).splitlines()
    assert changed.index("delete set inet portsentry ban_slots") < changed.index(
        "add set inet portsentry ban_slots { type mark; size 90; timeout 60s; flags dynamic,timeout; }")
    uncapped = NftablesBackend().capture_script(CaptureSpec.of(
        7373, 1024, {Protocol.TCP}, kernel=KernelBan(frozenset({Protocol.TCP}), timeout=60)), previous=spec)
    assert "delete set inet portsentry ban_slots" in uncapped and "size 60" not in uncapped


def test_guards_and_ports_are_replaced_in_one_script_with_merged_intervals() -> None:
    from ipaddress import ip_network

    backend = cli(Recorder())
    script = backend.guards_script(
        [ip_network("198.18.0.0/24"), IPv4Address("198.18.0.7"), ip_network("198.18.1.0/24"),
         IPv6Address("fd00::1")],
        [ip_network("0.0.0.0/8")])
    assert script == (
        "flush set inet portsentry protect4\n"
        "add element inet portsentry protect4 { 198.18.0.0/23 }\n"
        "flush set inet portsentry protect6\n"
        "add element inet portsentry protect6 { fd00::1/128 }\n"
        "flush set inet portsentry nokernel4\n"
        "add element inet portsentry nokernel4 { 0.0.0.0/8 }\n"
        "flush set inet portsentry nokernel6\n")
    assert backend.kernel_ports_script({Protocol.TCP: [1, 2, 3, 5, 79, 80], Protocol.UDP: []}) == (
        "flush set inet portsentry kports_tcp\n"
        "add element inet portsentry kports_tcp { 1-3, 5, 79-80 }\n"
        "flush set inet portsentry kports_udp\n")
    with pytest.raises(TypeError):
        backend.guards_script(["198.18.0.1; flush ruleset"], [])  # type: ignore[list-item]


def test_caught_entries_are_parsed_and_released_with_add_then_delete() -> None:
    from portsentry.responders.nft_elements import parse_caught_json

    text = json.dumps({"nftables": [{"metainfo": {}}, {"set": {"name": "caught4", "elem": [
        {"concat": ["198.18.0.3", "udp", 53]},
        {"elem": {"val": {"concat": ["198.18.0.2", "tcp", 79]}, "timeout": 3600, "expires": 3599}},
        {"concat": ["not an address", "tcp", 1]}, {"concat": ["198.18.0.4", "sctp", 1]}, "junk"]}}]})
    assert parse_caught_json(text) == [(IPv4Address("198.18.0.3"), Protocol.UDP, 53),
                                       (IPv4Address("198.18.0.2"), Protocol.TCP, 79)]
    assert cli(Recorder()).release_script([(IPv6Address("fd00::2"), Protocol.TCP, 79)]) == (
        "add element inet portsentry caught6 { fd00::2 . tcp . 79 }\n"
        "delete element inet portsentry caught6 { fd00::2 . tcp . 79 }\n")


def test_dropped_counts_are_parsed_from_real_nft_output() -> None:
    from portsentry.responders.nft_elements import parse_dropped_json

    # Real `nft -j list set` output of nft 1.0.6, plus entries nft never writes.
    text = ('{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"set": '
            '{"family": "inet", "name": "dropped4", "table": "portsentry", "type": "ipv4_addr", '
            '"handle": 3, "size": 1000, "flags": ["timeout"], "timeout": 3600, "elem": ['
            '{"elem": {"val": "198.18.0.2", "expires": 3599, "counter": {"packets": 3, "bytes": 180}}}, '
            '{"elem": {"val": "198.18.0.3", "expires": 3599}}, '
            '{"elem": {"val": "198.18.0.4", "counter": {"packets": -1}}}, '
            '{"elem": {"val": "198.18.0.5", "counter": {"packets": true}}}, '
            '{"elem": {"val": 3, "counter": {"packets": 1}}}, '
            '{"elem": {"val": "fd00::2", "counter": {"packets": 7, "bytes": 1}}}, "198.18.0.6"]}}]}')
    assert parse_dropped_json(text) == {IPv4Address("198.18.0.2"): 3, IPv6Address("fd00::2"): 7}
    with pytest.raises(BackendError):
        parse_dropped_json("Error: No such file or directory")


# Any JSON value, with the keys nft's set listings use, so the shapes come near real ones.
NFT_SHAPES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["198.18.0.2", "fd00::2", "tcp", "udp"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["nftables", "set", "elem", "val", "counter", "packets", "concat", "expires",
                         "timeout"]), inner, max_size=4),
    max_leaves=30)


@given(NFT_SHAPES)
@FUZZ
def test_the_set_parsers_take_any_json_shape(shape: object) -> None:
    """Found by this test: `{"set": null}` made the caught and set parsers raise AttributeError,
    `{"nftables": 3}` TypeError, and a string expiry made the set parser raise ValueError."""
    from portsentry.responders.nft_elements import parse_caught_json, parse_dropped_json, parse_set_json

    text = json.dumps({"nftables": shape})
    counts = parse_dropped_json(text)  # an object with "nftables" in it: never refused whole
    assert all(isinstance(n, int) and n >= 0 for n in counts.values())
    assert all(isinstance(port, int) for _, _, port in parse_caught_json(text))
    with contextlib.suppress(BackendError):
        parse_set_json(text)


@given(st.text(max_size=400))
@FUZZ
def test_the_dropped_parser_never_raises_anything_but_backend_error(text: str) -> None:
    from portsentry.responders.nft_elements import parse_dropped_json

    with contextlib.suppress(BackendError):
        parse_dropped_json(text)


@given(st.text(max_size=400))
def test_the_caught_parser_never_raises_anything_but_backend_error(text: str) -> None:
    from portsentry.responders.nft_elements import parse_caught_json

    with contextlib.suppress(BackendError):
        parse_caught_json(text)


def test_a_ban_longer_than_the_kernel_can_time_goes_in_without_a_timeout() -> None:
    # nf_tables refused a 99999999-week ban with ERANGE, and with it every other ban of the
    # batch (a restore at start, a fleet's bans): from KERNEL_TIMEOUT_LIMIT on, no kernel timer;
    # the daemon lifts the element at the ban's end as it lifts every ban.
    long, far = KERNEL_TIMEOUT_LIMIT, 99999999 * 7 * 86400.0
    backend = NftablesBackend(runner=Recorder())
    assert backend.add_script(V4, far) == (
        "add element inet portsentry blocked4 { 198.18.0.9 }\n"
        "delete element inet portsentry blocked4 { 198.18.0.9 }\n"
        "add element inet portsentry blocked4 { 198.18.0.9 }\n")
    assert backend.add_ops([(V4, long), (V6, long - 1)])[2] == \
        ElementOp(NFT_MSG_NEWSETELEM, "blocked4", ((V4, None),))
    assert backend.add_ops([(V6, long - 1)])[2] == \
        ElementOp(NFT_MSG_NEWSETELEM, "blocked6", ((V6, (2**31 - 1) * 1000),))
    assert backend.restore_ops([(V4, far)]) == [ElementOp(NFT_MSG_NEWSETELEM, "blocked4", ((V4, None),))]
    fake = FakeNetlink()
    netlink_backend(fake).restore_many([(V4.packed, far), (IPv4Address("198.18.0.7").packed, 60.0)])
    reference = element_message("portsentry", ElementOp(NFT_MSG_NEWSETELEM, "blocked4", (
        (V4, None), (IPv4Address("198.18.0.7"), 60_000))), 0)
    sent = _messages(fake.sent[0])[1][2]
    assert sent[:8] == reference[:8] and sent[12:] == reference[12:]


def test_without_a_capture_a_flushed_table_is_repaired_once_and_not_after_teardown() -> None:
    # Connect modes install no NFLOG capture: the drop chain is what shows the table is there.
    listings = [RunResult(0, EMPTY_CHAIN, ""), RunResult(0, FULL_CHAIN, ""),
                RunResult(1, "", "Error: No such file or directory"), RunResult(0, EMPTY_CHAIN, ""),
                RunResult(0, FULL_CHAIN, "")]
    rec = Recorder({("nft", "-j", "list", "chain"): lambda argv, stdin: listings.pop(0),
                    ("nft", "-j", "list", "tables"): RunResult(0, '{"nftables": []}', "")})
    backend = cli(rec)
    assert backend.repair_capture() is False  # never set up here: nothing of ours to watch
    backend.setup()
    assert backend.repair_capture() is False  # intact
    rec.calls.clear()
    assert backend.repair_capture() is True  # `nft flush ruleset`
    assert [stdin for _, stdin in rec.calls] == [None, SETUP, None, RULES]
    assert backend.repair_capture() is False
    backend.teardown()
    assert backend.repair_capture() is False


# -- replacing the sets at start (bans.restore) ---------------------------------------------------

CAUGHT4_JSON = json.dumps({"nftables": [{"set": {"name": "caught4", "elem": [
    {"elem": {"val": {"concat": ["198.18.0.7", "tcp", 79]}, "timeout": 3600, "expires": 3000}},
    {"elem": {"val": {"concat": ["198.18.0.7", "udp", 161]}, "timeout": 3600, "expires": 3500}},
    {"elem": {"val": {"concat": ["198.18.0.9", "tcp", 79]}, "timeout": 3600, "expires": 10}}]}}]})
CAUGHT6_JSON = json.dumps({"nftables": [{"set": {"name": "caught6", "elem": [
    {"concat": ["fd00::7", "tcp", 79]}]}}]})


def caught_recorder(caught4: str = CAUGHT4_JSON, caught6: str = CAUGHT6_JSON) -> Recorder:
    return Recorder({
        ("nft", "-j", "list", "set", "inet", "portsentry", "caught4"): RunResult(0, caught4, ""),
        ("nft", "-j", "list", "set", "inet", "portsentry", "caught6"): RunResult(0, caught6, ""),
    })


NO_CAUGHT = json.dumps({"nftables": [{"set": {"name": "caught4"}}]})


def test_replace_all_empties_and_refills_both_sets_in_one_transaction_keeping_unsettled_kernel_bans() -> None:
    # A plain add left an element the store no longer knows in the set for ever (BLOCK_TIME 0).
    fake = FakeNetlink()
    backend = NftablesBackend(runner=caught_recorder(), socket_factory=lambda: fake)  # type: ignore[arg-type,return-value]
    backend.replace_all([(V4.packed, 60.0), (IPv4Address("198.18.0.2").packed, None)])
    assert len(fake.sent) == 1  # one transaction: the sets are never seen empty
    messages = _messages(fake.sent[0])
    assert [kind for kind, _, _ in messages] == [16, 0x0A0E, 0x0A0E, 0x0A0C, 0x0A0C, 17]
    # A flush names no element at all: an empty element list would delete nothing.
    flush4 = messages[1][2]
    assert flush4[16:] == bytes.fromhex("01000000" "0f000100706f727473656e7472790000"
                                        "0d000200626c6f636b65643400000000")
    assert b"blocked6" in messages[2][2]
    # The store's time for 198.18.0.9 (caught too), the caught entry's longest for 198.18.0.7,
    # none for fd00::7 (a kernel ban without timeout).
    add4 = element_message("portsentry", ElementOp(NFT_MSG_NEWSETELEM, "blocked4", (
        (V4, 60_000), (IPv4Address("198.18.0.2"), None), (IPv4Address("198.18.0.7"), 3_500_000))), 0)
    add6 = element_message("portsentry", ElementOp(NFT_MSG_NEWSETELEM, "blocked6",
                                                   ((IPv6Address("fd00::7"), None),)), 0)
    assert messages[3][2][:8] == add4[:8] and messages[3][2][12:] == add4[12:]
    assert messages[4][2][:8] == add6[:8] and messages[4][2][12:] == add6[12:]


def test_replace_all_over_nft_is_one_script() -> None:
    rec = caught_recorder(NO_CAUGHT, NO_CAUGHT)
    cli(rec).replace_all([(V4.packed, 60.0), (V6.packed, None)])
    assert rec.calls[-1] == (["nft", "-f", "-"], (
        "flush set inet portsentry blocked4\n"
        "flush set inet portsentry blocked6\n"
        "add element inet portsentry blocked4 { 198.18.0.9 timeout 60s }\n"
        "add element inet portsentry blocked6 { fd00::9 }\n"))
    rec = caught_recorder(NO_CAUGHT, NO_CAUGHT)
    cli(rec).replace_all([])  # a store without bans: both sets emptied
    assert rec.calls[-1] == (["nft", "-f", "-"], "flush set inet portsentry blocked4\n"
                                                 "flush set inet portsentry blocked6\n")


class DumpSocket:
    """Answers a set element dump with `datagrams`, one per recv."""

    def __init__(self, *datagrams: bytes) -> None:
        self.sent: list[bytes] = []
        self.datagrams = list(datagrams)
        self.closed = False

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.datagrams.pop(0)

    def settimeout(self, value: float | None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _reply(kind: int, seq: int, body: bytes = b"") -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 2, seq, 0) + body + bytes(-length % 4)


def test_holds_any_reads_one_answer_of_a_dump_and_never_the_whole_set() -> None:
    from portsentry.netlink.codec import attr, nested
    from portsentry.responders.nft_elements import element_attribute as elem

    element = nested(3, elem(V4, 1000))  # NFTA_SET_ELEM_LIST_ELEMENTS holding one element
    head = b"\x01\x00\x00\x00" + attr(1, b"portsentry\0") + attr(2, b"blocked4\0")
    full = DumpSocket(_reply(0x0A0C, 1, head + element))
    assert NftablesBackend(runner=Recorder(), socket_factory=lambda: full).holds_any()  # type: ignore[arg-type,return-value]
    assert full.closed and len(full.sent) == 1  # the rest of the dump goes with the socket
    request = full.sent[0]
    assert struct.unpack_from("=IHHII", request) == (len(request), 0x0A0D, 0x301, 1, 0)
    sockets = [DumpSocket(_reply(3, 1)), DumpSocket(_reply(0x0A0C, 1, head + nested(3)), _reply(3, 1))]
    assert not NftablesBackend(runner=Recorder(), socket_factory=lambda: sockets.pop(0)).holds_any()  # type: ignore[arg-type,return-value]
    refused = DumpSocket(_reply(2, 1, struct.pack("=i", -errno.ENOENT) + bytes(16)))
    with pytest.raises(BackendError, match="No such file"):
        NftablesBackend(runner=Recorder(), socket_factory=lambda: refused).holds_any()  # type: ignore[arg-type,return-value]
    assert cli(Recorder()).holds_any()  # nft would list every element: not asked


def test_caught_entries_are_kept_track_of_until_read_empty_after_the_first_probe_ban_goes() -> None:
    # A reload that turns the first-probe ban off (KERNEL_BAN, SCAN_TRIGGER, CAPTURE), or a start
    # with it off after a run that had it: kernel bans still waiting for their record stayed in
    # the kernel with none, out of `list`'s and unblock's sight, until their timeout.
    from portsentry.responders.nft_capture import KernelBan

    answers = {"caught4": CAUGHT4_JSON, "caught6": CAUGHT6_JSON}

    def listing(argv: Sequence[str], stdin: str | None) -> RunResult:
        return RunResult(0, answers[argv[-1]], "")

    backend = NftablesBackend(runner=Recorder({("nft", "-j", "list", "set"): listing}), mechanism="cli")
    assert backend.keeps_caught()  # a previous run's entries may be there
    backend.capture_rules(7373, 1024, {Protocol.TCP}, kernel=None)
    assert backend.keeps_caught() and backend.caught()  # entries left: kept track of
    answers.update(caught4=NO_CAUGHT, caught6=NO_CAUGHT)
    assert backend.caught() == [] and not backend.keeps_caught()  # none left: no more reads
    backend.capture_rules(7373, 1024, {Protocol.TCP}, kernel=KernelBan(frozenset({Protocol.TCP}), 60))
    assert backend.keeps_caught()
    backend.capture_rules(7373, 1024, {Protocol.TCP}, kernel=None)  # the reload turns it off
    assert backend.keeps_caught()


def test_a_repair_of_the_capture_keeps_the_last_minute_s_ban_slots() -> None:
    # The capture chain gone (`portsentry flush`, a script flushing our chains), the table kept:
    # the repair made ban_slots again, empty, and so opened a fresh minute of BAN_RATE_LIMIT
    # kernel bans, which capture_script's "a repair keeps the last minute's slots" ruled out.
    from portsentry.responders.nft_capture import KernelBan

    def chain(argv: Sequence[str], stdin: str | None) -> RunResult:
        if argv[-1] == "filter":
            return RunResult(0, FULL_CHAIN, "")
        return RunResult(1, "", "Error: No such file or directory")

    rec = Recorder({("nft", "-j", "list", "chain"): chain})
    backend = cli(rec)
    backend.setup()
    kernel = KernelBan(frozenset({Protocol.TCP}), 60, rate=60)
    backend.capture_rules(7373, 1024, {Protocol.TCP}, kernel=kernel)
    rec.calls.clear()
    assert backend.repair_capture() is True
    scripts = "".join(stdin or "" for _argv, stdin in rec.calls)
    assert "add set inet portsentry ban_slots { type mark; size 60;" in scripts  # made if flushed
    assert "delete set inet portsentry ban_slots" not in scripts


def test_the_daemon_s_own_ban_claims_a_kernel_ban_slot_unless_the_kernel_made_it() -> None:
    """BAN_RATE_LIMIT is one cap for the kernel's first-probe bans and the daemon's: a ban of the
    connect modes took no slot of ban_slots, so beside a kernel-banning stealth mode a minute
    held N of each. A claim is one transaction: the address added only if absent (EXCL) and
    taken out again, and a slot from the daemon's own range; EEXIST says the kernel banned it
    (and took its slot), ENFILE that every slot is taken."""
    from portsentry.responders.nft_capture import DAEMON_SLOTS, KernelBan

    fake = FakeNetlink()
    backend = netlink_backend(fake)
    assert backend.claim_ban_slot(V4) and fake.sent == []  # no capture: no kernel cap to claim from
    backend.capture_rules(7373, 1024, {Protocol.TCP}, kernel=KernelBan(frozenset({Protocol.TCP}), 60))
    assert backend.claim_ban_slot(V4) and fake.sent == []  # a kernel ban without a cap
    backend.capture_rules(7373, 1024, {Protocol.TCP}, kernel=KernelBan(frozenset({Protocol.TCP}), 60, rate=2))
    assert backend.claim_ban_slot(V4)
    sent = _messages(fake.sent[-1])
    assert [kind for kind, _, _ in sent] == [16, 0x0A0C, 0x0A0E, 0x0A0C, 17]
    assert sent[1][1] & 0x200 and not sent[3][1] & 0x200  # EXCL on the ban set's add only
    assert b"blocked4\0" in sent[1][2] and b"blocked4\0" in sent[2][2] and b"ban_slots\0" in sent[3][2]
    slot = struct.unpack("=I", sent[3][2][-4:])[0]
    assert slot >= DAEMON_SLOTS  # above the four ban rules' ranges
    fake.fail = {0: errno.EEXIST}
    assert backend.claim_ban_slot(V4)  # the kernel's own ban: its rule took the slot
    fake.fail = {2: errno.ENFILE}
    assert not backend.claim_ban_slot(V4)  # the minute's slots are taken
    fake.fail = {0: errno.ENOENT}
    with pytest.raises(BackendError):
        backend.claim_ban_slot(V4)


def test_the_claim_of_a_ban_slot_over_nft_f() -> None:
    from portsentry.responders.nft_capture import KernelBan

    answer = RunResult(0, "", "")
    rec = Recorder({("nft", "-f"): lambda argv, stdin: answer})
    backend = cli(rec)
    backend.capture_rules(7373, 1024, {Protocol.TCP}, kernel=KernelBan(frozenset({Protocol.TCP}), 60, rate=2))
    rec.calls.clear()
    assert backend.claim_ban_slot(V6)
    script = rec.calls[0][1] or ""
    assert re.fullmatch(r"create element inet portsentry blocked6 \{ fd00::9 \}\n"
                        r"delete element inet portsentry blocked6 \{ fd00::9 \}\n"
                        r"add element inet portsentry ban_slots \{ \d+ \}\n", script), script
    answer = RunResult(1, "", "Error: Could not process rule: File exists")
    assert backend.claim_ban_slot(V6)
    answer = RunResult(1, "", "Error: Could not process rule: Too many open files in system")
    assert not backend.claim_ban_slot(V6)
