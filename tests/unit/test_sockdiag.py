"""sock_diag listener dumps: the reply parser on crafted and arbitrary bytes, and a real dump."""

from __future__ import annotations

import os
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.probe import Protocol
from portsentry.sensors.sockdiag import (
    NLMSG_DONE,
    NLMSGHDR,
    SOCK_DIAG_BY_FAMILY,
    SockDiag,
    parse_ports,
    request,
)

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
