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
    TCPDIAG_GETSOCK,
    SockDiag,
    exact_request,
    parse_ports,
    request,
    tcp_request_any_family,
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


def test_holds_asks_the_kernel_about_one_port_in_both_families():
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    v6.bind(("::", 0))
    v6.listen()
    v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    v4.bind(("127.0.0.1", 0))
    v4.listen()
    bound_only = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, not listening
    bound_only.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    diag = SockDiag()
    try:
        assert diag.holds(Protocol.TCP, v6.getsockname()[1])
        assert diag.holds(Protocol.TCP, v4.getsockname()[1])
        assert not diag.holds(Protocol.TCP, bound_only.getsockname()[1])
        assert not diag.holds(Protocol.TCP, udp.getsockname()[1])
        assert diag.holds(Protocol.UDP, udp.getsockname()[1])
        assert not diag.holds(Protocol.UDP, v4.getsockname()[1])
        # The socket is reusable after every answer, found or not: the dump was read to its end.
        assert v4.getsockname()[1] in diag.ports(Protocol.TCP)
    finally:
        for sock in (diag, v6, v4, bound_only, udp):
            sock.close()


def test_holds_reads_each_dump_to_its_end_and_stops_at_the_first_family_that_has_the_port():
    diag, fake = faked(
        numbered(1, SOCK_DIAG_BY_FAMILY, diag_msg(79)),
        numbered(9, SOCK_DIAG_BY_FAMILY, diag_msg(80)) + numbered(1, NLMSG_DONE, bytes(4)),
        numbered(2, NLMSG_DONE, bytes(4)),
        numbered(1, SOCK_DIAG_BY_FAMILY, diag_msg(81)) + numbered(3, NLMSG_DONE, bytes(4)),
        numbered(4, NLMSG_DONE, bytes(4)),
        numbered(5, SOCK_DIAG_BY_FAMILY, diag_msg(80)) + numbered(5, NLMSG_DONE, bytes(4)),
    )
    assert diag.holds(Protocol.UDP, 79)  # found in IPv4 (its dump read to DONE): IPv6 not asked
    assert fake.sent == [request(socket.AF_INET, Protocol.UDP, 1, 79)]
    assert not diag.holds(Protocol.UDP, 81)  # an answer to an earlier request (seq 1) does not count
    assert fake.sent[1:] == [request(socket.AF_INET, Protocol.UDP, 2, 81),
                             request(socket.AF_INET6, Protocol.UDP, 3, 81)]
    assert diag.holds(Protocol.UDP, 80)  # found in IPv6
    assert fake.replies == []


def test_holds_asks_tcp_in_one_dump_and_falls_back_to_one_per_family_when_refused():
    refused = struct.pack("=i", -errno.EINVAL) + NLMSGHDR.pack(72, TCPDIAG_GETSOCK, 0x301, 2, 0)
    diag, fake = faked(
        numbered(1, TCPDIAG_GETSOCK, diag_msg(22)) + numbered(1, NLMSG_DONE, bytes(4)),
        numbered(2, 2, refused),
        numbered(3, NLMSG_DONE, bytes(4)),
        numbered(4, SOCK_DIAG_BY_FAMILY, diag_msg(22)) + numbered(4, NLMSG_DONE, bytes(4)),
    )
    assert diag.holds(Protocol.TCP, 22)
    assert fake.sent == [tcp_request_any_family(1, 22)]
    assert diag.holds(Protocol.TCP, 22)  # refused once (an old or stripped kernel): per family
    assert fake.sent[1:] == [tcp_request_any_family(2, 22), request(socket.AF_INET, Protocol.TCP, 3, 22),
                             request(socket.AF_INET6, Protocol.TCP, 4, 22)]
    assert not diag._both_families


def test_holds_raises_when_the_kernel_refuses():
    error = struct.pack("=i", -errno.ENOENT) + NLMSGHDR.pack(72, SOCK_DIAG_BY_FAMILY, 0x301, 1, 0)
    diag, _fake = faked(numbered(1, 2, error))
    with pytest.raises(OSError) as info:
        diag.holds(Protocol.UDP, 53)
    assert info.value.errno == errno.ENOENT


def packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def test_exact_request_is_inet_diags_sockid_with_udps_src_and_dst_swapped():
    local, remote = packed("198.18.0.1"), packed("198.18.0.2")
    tcp = exact_request(Protocol.TCP, local, 79, remote, 40000, 5)
    length, kind, flags, seq, _pid = NLMSGHDR.unpack_from(tcp)
    assert (length, kind, flags, seq) == (len(tcp), SOCK_DIAG_BY_FAMILY, 1, 5)  # no NLM_F_DUMP
    family, proto, _ext, _states = struct.unpack_from("=BBBxI", tcp, 16)
    assert (family, proto) == (socket.AF_INET, socket.IPPROTO_TCP)
    assert struct.unpack_from("!HH", tcp, 24) == (79, 40000)
    assert tcp[28:32] == local and tcp[44:48] == remote
    assert tcp[60:] == bytes(4) + b"\xff" * 8  # any interface, no cookie
    udp = exact_request(Protocol.UDP, local, 53, remote, 40000, 5)
    assert struct.unpack_from("!HH", udp, 24) == (40000, 53)
    assert udp[28:32] == remote and udp[44:48] == local
    six = exact_request(Protocol.TCP, packed("fd00::1"), 79, packed("fd00::2"), 1, 1)
    assert six[16] == socket.AF_INET6 and six[28:44] == packed("fd00::1")


def test_takes_is_the_kernels_lookup_for_the_packet():
    """Against the real kernel: the socket that would take each packet, by address and port."""
    dual = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 0))
    dual.listen()
    only6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    only6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    only6.bind(("::", 0))
    only6.listen()
    one_address = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    one_address.bind(("127.0.0.1", 0))
    one_address.listen()
    bound_only = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound_only.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    diag = SockDiag()
    here, there = packed("127.0.0.1"), packed("127.0.0.9")
    here6, there6 = packed("::1"), packed("::1")
    try:
        def takes(protocol: Protocol, sock: socket.socket, local: bytes = here,
                  remote: bytes = there) -> bool:
            return diag.takes(protocol, local, sock.getsockname()[1], remote, 40000)

        assert takes(Protocol.TCP, dual)  # an IPv4 packet goes to a dual-stack listener
        assert takes(Protocol.TCP, dual, here6, there6)
        assert not takes(Protocol.TCP, only6)  # ... but never to an IPv6-only one
        assert takes(Protocol.TCP, only6, here6, there6)
        assert takes(Protocol.TCP, one_address)
        assert not takes(Protocol.TCP, one_address, packed("127.0.0.2"))  # sent to another address
        assert not takes(Protocol.TCP, bound_only)
        assert not takes(Protocol.TCP, udp)
        assert takes(Protocol.UDP, udp)
        assert not takes(Protocol.UDP, one_address)
        assert diag._exact  # answered exactly, not by the fallback
        # The socket is reusable after every answer, found or not.
        assert dual.getsockname()[1] in diag.ports(Protocol.TCP)
    finally:
        for sock in (diag, dual, only6, one_address, bound_only, udp):
            sock.close()


def test_takes_skips_stale_answers_and_reads_enoent_as_no_socket():
    enoent = struct.pack("=i", -errno.ENOENT) + NLMSGHDR.pack(72, SOCK_DIAG_BY_FAMILY, 1, 2, 0)
    diag, fake = faked(
        numbered(1, SOCK_DIAG_BY_FAMILY, diag_msg(79)),  # answers an earlier request
        numbered(2, 2, enoent),
        numbered(3, SOCK_DIAG_BY_FAMILY, diag_msg(79)),
    )
    diag._seq = 1
    local, remote = packed("198.18.0.1"), packed("198.18.0.2")
    assert not diag.takes(Protocol.TCP, local, 79, remote, 1)
    assert diag.takes(Protocol.TCP, local, 79, remote, 1)
    assert fake.sent == [exact_request(Protocol.TCP, local, 79, remote, 1, 2),
                         exact_request(Protocol.TCP, local, 79, remote, 1, 3)]


def test_takes_falls_back_to_holds_where_the_kernel_has_no_exact_requests_and_raises_otherwise():
    refused = struct.pack("=i", -errno.EOPNOTSUPP) + NLMSGHDR.pack(72, SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    diag, fake = faked(
        numbered(1, 2, refused),
        numbered(2, TCPDIAG_GETSOCK, diag_msg(79)) + numbered(2, NLMSG_DONE, bytes(4)),
    )
    local, remote = packed("198.18.0.1"), packed("198.18.0.2")
    assert diag.takes(Protocol.TCP, local, 79, remote, 1)
    assert fake.sent[1:] == [tcp_request_any_family(2, 79)]
    assert not diag._exact
    failed = struct.pack("=i", -errno.EPERM) + NLMSGHDR.pack(72, SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    diag, _fake = faked(numbered(1, 2, failed))
    with pytest.raises(OSError) as info:
        diag.takes(Protocol.UDP, local, 53, remote, 1)
    assert info.value.errno == errno.EPERM
    diag, _fake = faked(numbered(1, 2, bytes(4)))  # an error message too short to read
    with pytest.raises(OSError):
        diag.takes(Protocol.UDP, local, 53, remote, 1)
