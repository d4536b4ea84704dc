"""The netlink codec: golden bytes, the walkers on crafted and arbitrary bytes, build -> parse round
trips, and the dump / ack conversations over fake sockets and one real NETLINK_ROUTE dump."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.netlink import codec as netlink
from portsentry.netlink.codec import (
    NLA_F_NESTED,
    NLA_F_NET_BYTEORDER,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    Message,
    NoAnswer,
    acks,
    attr,
    attributes,
    dump,
    error_reply,
    message,
    messages,
    nested,
    nf_message,
    split,
    wait_acks,
)

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "200")), deadline=None)

# -- the kernel's side, written out here (struct layouts not imported) -----------------------------


def raw_message(kind: int, body: bytes, seq: int = 1, flags: int = 0, pid: int = 0) -> bytes:
    data = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, pid) + body
    return data + bytes(-len(data) % 4)


def raw_error(seq: int, code: int, kind: int = 0x0A0C) -> bytes:
    """NLMSG_ERROR answering request `seq` (errno `code`, 0 = ack), quoting its header only."""
    quoted = struct.pack("=IHHII", 100, kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
    return raw_message(NLMSG_ERROR, struct.pack("=i", -code) + quoted, seq=seq)


def done(seq: int, flags: int = NLM_F_MULTI) -> bytes:
    return raw_message(NLMSG_DONE, struct.pack("=i", 0), seq=seq, flags=flags)


# -- building ----------------------------------------------------------------------------------------


def test_message_bytes() -> None:
    assert message(20, NLM_F_REQUEST | NLM_F_DUMP, 7, b"\x02\0\0\0") == bytes.fromhex(
        "14000000" "1400" "0103" "07000000" "00000000" "02000000"
    )


def test_message_pads_the_body_but_counts_only_what_is_there() -> None:
    data = message(1, 0, 1, b"abcde", pid=9)
    assert len(data) == 24
    assert struct.unpack_from("=IHHII", data) == (21, 1, 0, 1, 9)
    assert data[16:] == b"abcde\0\0\0"


def test_attr_and_nested_bytes() -> None:
    assert attr(3, b"\x01") == bytes.fromhex("05000300" "01000000")
    assert attr(7, b"") == bytes.fromhex("04000700")
    assert nested(2, attr(1, b"ab"), attr(4, b"wxyz")) == bytes.fromhex(
        "14000280" "06000100" "61620000" "08000400" "7778797a"
    )


def test_attr_refuses_a_value_nla_len_cannot_count() -> None:
    assert len(attr(1, bytes(0xFFFF - 4))) == 0xFFFF + 1  # the largest, plus its padding
    with pytest.raises(ValueError, match="65535"):
        attr(1, bytes(0xFFFF - 3))


def test_nf_message_puts_nfgenmsg_first_big_endian() -> None:
    assert nf_message(16, NLM_F_REQUEST, 1, 0, 10) == bytes.fromhex(
        "14000000" "1000" "0100" "01000000" "00000000" "0000" "000a"
    )
    data = nf_message(0x0401, NLM_F_REQUEST | NLM_F_ACK, 2, 0, 7373, attr(1, b"\x01"))
    assert data[16:20] == b"\0\0" + (7373).to_bytes(2, "big")
    assert data[20:] == attr(1, b"\x01")


# -- splitting datagrams -----------------------------------------------------------------------------


def test_split_reports_spans_and_a_clean_stop() -> None:
    data = raw_message(20, b"abcd", seq=5, flags=2, pid=77) + raw_message(3, b"xy", seq=6)
    spans, stop = split(data)
    assert spans == [(20, 2, 5, 77, 16, 20), (3, 0, 6, 0, 36, 38)]
    assert stop == len(data)
    assert messages(data) == [Message(20, 2, 5, 77, b"abcd"), Message(3, 0, 6, 0, b"xy")]


def test_split_accepts_a_last_message_without_its_padding() -> None:
    data = raw_message(3, b"xy")[:18]
    spans, stop = split(data)
    assert [span[0] for span in spans] == [3]
    assert stop >= len(data)


@pytest.mark.parametrize(
    ("data", "kept", "stop"),
    [
        (b"", 0, 0),
        (b"\1\2\3", 0, 0),  # a tail too short for a header
        (struct.pack("=IHHII", 15, 20, 0, 0, 0), 0, 0),  # length below the header
        (struct.pack("=IHHII", 17, 20, 0, 0, 0), 0, 0),  # longer than the datagram
        (raw_message(20, b"ok") + struct.pack("=IHHII", 4096, 20, 0, 0, 0), 1, 20),
        (raw_message(20, b"ok") + b"\0" * 7, 1, 20),
    ],
)
def test_split_stops_where_a_length_cannot_be_trusted(data: bytes, kept: int, stop: int) -> None:
    spans, where = split(data)
    assert (len(spans), where) == (kept, stop)


# -- attributes ---------------------------------------------------------------------------------------


def test_attributes_mask_the_nested_and_byte_order_flags() -> None:
    data = attr(9 | NLA_F_NET_BYTEORDER, b"p") + nested(3, attr(1, b"q")) + attr(4, b"r")
    assert attributes(data) == ([(9, b"p"), (3, attr(1, b"q")), (4, b"r")], True)


def test_attributes_pick_only_the_wanted_types_within_the_bounds() -> None:
    data = b"HEAD" + attr(1, b"a") + attr(2, b"bb") + attr(1, b"c") + b"TAIL"
    end = len(data) - 4
    assert attributes(data, 4, end, {1}) == ([(1, b"a"), (1, b"c")], True)
    assert attributes(data, 4, end, frozenset()) == ([], True)


@pytest.mark.parametrize(
    ("data", "start", "end", "found", "clean"),
    [
        (b"", 0, None, [], True),
        (attr(1, b"a") + b"\0\0\0", 0, None, [(1, b"a")], True),  # tail shorter than a header
        (attr(1, b"a") + struct.pack("=HH", 3, 2), 0, None, [(1, b"a")], False),  # below header
        (attr(1, b"a") + struct.pack("=HH", 40, 2) + b"zz", 0, None, [(1, b"a")], False),
        (attr(1, b"abcd"), 0, 6, [], False),  # overruns `end`, not just the data
        (b"\0" * 8, 9, 8, [], False),  # a fixed header that did not fit
    ],
)
def test_attributes_stop_at_a_length_that_cannot_be_trusted(
    data: bytes, start: int, end: int | None, found: list[tuple[int, bytes]], clean: bool
) -> None:
    assert attributes(data, start, end) == (found, clean)


# -- errors and acks -------------------------------------------------------------------------------------


def test_error_reply_and_acks() -> None:
    data = raw_message(20, b"x") + raw_error(9, errno.ENOENT) + raw_error(10, 0)
    spans, _ = split(data)
    assert error_reply(data, spans[1][4], spans[1][5]) == (9, errno.ENOENT)
    assert acks(data) == [(9, errno.ENOENT), (10, 0)]


def test_acks_skip_errors_too_short_to_say_what_they_answer() -> None:
    short = raw_message(NLMSG_ERROR, struct.pack("=i", -1) + bytes(8), seq=4)
    assert acks(short + raw_error(5, 0)) == [(5, 0)]
    assert error_reply(short, 16, 28) is None
    assert acks(raw_error(5, 0)[:30]) == []


# -- properties ----------------------------------------------------------------------------------------

bodies = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1), st.binary(max_size=64),
    ),
    max_size=8,
)
attribute_lists = st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=40)), max_size=8)


@FUZZ
@given(st.binary(max_size=600), st.integers(-4, 700), st.integers(-4, 700))
def test_walkers_never_raise_on_arbitrary_bytes(data: bytes, start: int, end: int) -> None:
    spans, stop = split(data)
    offset = 0
    for _kind, _flags, _seq, _pid, first, last in spans:
        assert offset + 16 == first <= last <= len(data)
        offset = (last + 3) & ~3
    assert stop == offset
    assert len(messages(data)) == len(spans)
    for seq, code in acks(data):
        assert 0 <= seq < 2**32 and -(2**31) < code <= 2**31
    found, _clean = attributes(data, max(start, 0), min(end, len(data)))
    assert all(0 <= kind <= 0x3FFF and value in data for kind, value in found)


@FUZZ
@given(bodies)
def test_messages_round_trip(parts: list[tuple[int, int, int, int, bytes]]) -> None:
    data = b"".join(message(kind, flags, seq, body, pid) for kind, flags, seq, pid, body in parts)
    assert messages(data) == [Message(*part) for part in parts]
    assert split(data)[1] == len(data)


@FUZZ
@given(attribute_lists, st.sampled_from([0, NLA_F_NESTED, NLA_F_NET_BYTEORDER]))
def test_attributes_round_trip(items: list[tuple[int, bytes]], flag: int) -> None:
    data = b"".join(attr(kind | flag, value) for kind, value in items)
    assert attributes(data) == (items, True)
    outer = message(5, 0, 1, b"FIXD" + nested(1, data))
    (span,), _ = split(outer)
    ((kind, inner),), clean = attributes(outer, span[4] + 4, span[5])
    assert (kind, clean) == (1, True)
    assert attributes(inner) == (items, True)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 4095)), max_size=6))
def test_acks_round_trip(answers: list[tuple[int, int]]) -> None:
    data = b"".join(raw_error(seq, code) for seq, code in answers)
    assert acks(data) == answers


# -- the conversations, over fake sockets -----------------------------------------------------------


class FakeSocket:
    """Hands out `replies` one per recv (an exception is raised instead); records what is sent."""

    def __init__(self, *replies: bytes | BaseException) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.replies:
            raise TimeoutError("timed out")
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply


def fake(*replies: bytes | BaseException) -> socket.socket:
    return FakeSocket(*replies)  # type: ignore[return-value]


def test_dump_collects_its_own_messages_until_done() -> None:
    sock = fake(
        raw_message(20, b"stale", seq=6) + raw_message(20, b"one", seq=7),
        raw_message(20, b"two", seq=7) + done(7),
        raw_message(20, b"after", seq=7),
    )
    found, interrupted = dump(sock, b"REQUEST", 7)
    assert [m.payload for m in found] == [b"one", b"two"]
    assert not interrupted
    assert sock.sent == [b"REQUEST"]  # type: ignore[attr-defined]


def test_dump_reports_an_interrupted_dump() -> None:
    sock = fake(raw_message(20, b"one", seq=3, flags=NLM_F_MULTI | NLM_F_DUMP_INTR) + done(3))
    assert dump(sock, b"", 3) == ([Message(20, NLM_F_MULTI | NLM_F_DUMP_INTR, 3, 0, b"one")], True)


def test_dump_raises_the_kernels_errno_and_ends_on_a_bare_ack() -> None:
    with pytest.raises(OSError) as info:
        dump(fake(raw_error(2, errno.ENOENT, kind=20)), b"", 2)
    assert info.value.errno == errno.ENOENT
    assert dump(fake(raw_message(20, b"x", seq=2) + raw_error(2, 0)), b"", 2)[0][0].payload == b"x"


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (b"", errno.EIO),
        (raw_message(20, b"x", seq=1)[:-4], errno.EBADMSG),
        (raw_message(20, b"x", seq=1) + b"\0" * 5, errno.EBADMSG),
        (raw_message(NLMSG_ERROR, b"\0" * 4, seq=1), errno.EBADMSG),  # an error that says nothing
    ],
)
def test_dump_refuses_replies_it_cannot_read(reply: bytes, code: int) -> None:
    with pytest.raises(OSError) as info:
        dump(fake(reply), b"", 1)
    assert info.value.errno == code


def test_dump_timeout_propagates() -> None:
    with pytest.raises(TimeoutError):
        dump(fake(raw_message(20, b"x", seq=1)), b"", 1)


def test_wait_acks_until_every_request_is_answered() -> None:
    others: list[bytes] = []
    packets = raw_message(0x0400, b"packet")
    sock = fake(raw_error(1, 0) + raw_error(99, errno.EPERM), packets, raw_error(2, 0) + raw_error(3, 0))
    assert wait_acks(sock, [1, 2, 3], other=others.append) == {1: 0, 2: 0, 3: 0}
    assert others == [packets]


def test_wait_acks_stops_at_the_first_refusal() -> None:
    sock = fake(raw_error(4, 0) + raw_error(5, errno.ENFILE) + raw_error(6, 0), raw_error(7, 0))
    assert wait_acks(sock, range(4, 8)) == {4: 0, 5: errno.ENFILE, 6: 0}
    assert wait_acks(fake(), []) == {}


def test_wait_acks_names_how_many_went_unanswered() -> None:
    with pytest.raises(NoAnswer) as info:
        wait_acks(fake(raw_error(1, 0), b"\xff" * 3), [1, 2, 3])
    assert info.value.missing == 2
    assert isinstance(info.value, TimeoutError)


def test_real_route_dump_lists_loopback() -> None:
    """RTM_GETLINK needs no privilege; every namespace has `lo`."""
    with netlink.open_socket(netlink.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        request = message(18, NLM_F_REQUEST | NLM_F_DUMP, 42, bytes(16))  # RTM_GETLINK, ifinfomsg
        found, _interrupted = dump(sock, request, 42)
    names = [
        value.rstrip(b"\0")
        for m in found
        if m.type == 16  # RTM_NEWLINK
        for kind, value in attributes(m.payload, 16, None, {3})[0]  # IFLA_IFNAME
    ]
    assert b"lo" in names
