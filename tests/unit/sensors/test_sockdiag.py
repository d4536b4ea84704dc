"""sock_diag listener dumps: the reply parser on crafted and arbitrary bytes, and a real dump."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.core.probe import Protocol
from portsentry.sensors.sockdiag import (
    NLMSG_DONE,
    NLMSGHDR,
    SOCK_DIAG_BY_FAMILY,
    SockDiag,
    parse_ports,
    request,
)
from tests.unit.netlink.test_codec import FakeSocket

EXAMPLES = int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "300"))


def message(kind: int, body: bytes) -> bytes:
    data = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, 0, 1, 0) + body
    return data + bytes(-len(data) % 4)


def diag_msg(port: int) -> bytes:
    return struct.pack("=BBBB", socket.AF_INET, 10, 0, 0) + struct.pack("!HH", port, 0) + bytes(64)


def test_request_asks_for_listening_tcp_only_and_any_udp_state():
    tcp = request(socket.AF_INET6, Protocol.TCP, 7)
    length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(tcp)
    assert (length, kind, flags, seq) == (len(tcp), SOCK_DIAG_BY_FAMILY, 0x301, 7)
    family, proto, _ext, states = struct.unpack_from("=BBBxI", tcp, NLMSGHDR.size)
    assert (family, proto, states) == (socket.AF_INET6, socket.IPPROTO_TCP, 1 << 10)
    udp = request(socket.AF_INET, Protocol.UDP, 8)
    assert struct.unpack_from("=BBBxI", udp, NLMSGHDR.size)[3] == 0xFFFFFFFF


def test_parse_reads_source_ports_until_done():
    data = message(SOCK_DIAG_BY_FAMILY, diag_msg(80)) + message(SOCK_DIAG_BY_FAMILY, diag_msg(443))
    assert parse_ports(data) == ({80, 443}, False)
    assert parse_ports(data + message(NLMSG_DONE, bytes(4))) == ({80, 443}, True)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=512))
def test_parse_never_raises_on_arbitrary_bytes(data):
    ports, _done = parse_ports(data)
    assert all(0 < port < 65536 for port in ports)


def test_real_dump_sees_a_listener_and_a_udp_socket():
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.bind(("::", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    diag = SockDiag()
    try:
        assert tcp.getsockname()[1] in diag.ports(Protocol.TCP)
        assert udp.getsockname()[1] in diag.ports(Protocol.UDP)
        assert udp.getsockname()[1] not in diag.ports(Protocol.TCP)
    finally:
        diag.close()
        tcp.close()
        udp.close()


def faked(*replies: bytes) -> tuple[SockDiag, FakeSocket]:
    diag = SockDiag()
    diag._sock.close()
    fake = FakeSocket(*replies)
    diag._sock = fake  # type: ignore[assignment]
    return diag, fake


def numbered(seq: int, kind: int, body: bytes) -> bytes:
    data = NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, 2, seq, 0) + body
    return data + bytes(-len(data) % 4)


def test_ports_dumps_both_families_and_skips_answers_to_other_requests():
    diag, fake = faked(
        numbered(9, SOCK_DIAG_BY_FAMILY, diag_msg(22)) + numbered(1, SOCK_DIAG_BY_FAMILY, diag_msg(80)),
        numbered(1, SOCK_DIAG_BY_FAMILY, diag_msg(0)) + numbered(1, NLMSG_DONE, bytes(4)),
        numbered(2, SOCK_DIAG_BY_FAMILY, diag_msg(443)) + numbered(2, NLMSG_DONE, bytes(4)),
    )
    assert diag.ports(Protocol.TCP) == {80, 443}
    assert fake.sent == [request(socket.AF_INET, Protocol.TCP, 1), request(socket.AF_INET6, Protocol.TCP, 2)]


def test_a_refused_dump_raises_so_that_the_caller_can_fall_back_to_proc():
    # No udp_diag module (and none loadable): the kernel answers the dump with ENOENT, which must
    # not read as "no UDP port is bound".
    error = struct.pack("=i", -errno.ENOENT) + NLMSGHDR.pack(72, SOCK_DIAG_BY_FAMILY, 0x301, 1, 0)
    diag, _fake = faked(numbered(1, 2, error))
    with pytest.raises(OSError) as info:
        diag.ports(Protocol.UDP)
    assert info.value.errno == errno.ENOENT


def test_parse_counts_a_short_tail_as_unfinished_and_a_bad_header_as_the_end():
    data = message(SOCK_DIAG_BY_FAMILY, diag_msg(80))
    assert parse_ports(data + b"\0" * 8) == ({80}, False)
    assert parse_ports(data + NLMSGHDR.pack(4096, SOCK_DIAG_BY_FAMILY, 0, 1, 0)) == ({80}, True)
    assert parse_ports(message(SOCK_DIAG_BY_FAMILY, diag_msg(80)[:5])) == (set(), False)
