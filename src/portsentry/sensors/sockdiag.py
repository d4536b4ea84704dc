"""Listening TCP and bound UDP ports straight from the kernel (NETLINK_SOCK_DIAG, as `ss -l` does).

Reading /proc/net/tcp makes the kernel walk every bucket of the TCP hash table (2-5 ms even
on an idle host); an inet_diag dump asking only for LISTEN sockets walks the listening table,
which is tiny, so the stealth sensor can afford to check before every new hit.
"""

from __future__ import annotations

import socket
import struct

from ..probe import Protocol

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes).
INET_DIAG_REQ_V2 = struct.Struct("=BBBxI48x")
# inet_diag_msg starts: family, state, timer, retrans, then sockid: sport (big endian) first.
INET_DIAG_MSG_HEAD = struct.Struct("=BBBB")
SPORT = struct.Struct("!H")
SPORT_OFFSET = INET_DIAG_MSG_HEAD.size


def request(family: int, protocol: Protocol, seq: int) -> bytes:
    proto = socket.IPPROTO_TCP if protocol is Protocol.TCP else socket.IPPROTO_UDP
    states = 1 << TCP_LISTEN if protocol is Protocol.TCP else ALL_STATES
    body = INET_DIAG_REQ_V2.pack(family, proto, 0, states)
    header = NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                           seq, 0)
    return header + body


def parse_ports(data: bytes) -> tuple[set[int], bool]:
    """Local ports in one netlink reply buffer, and whether the dump is complete. Never raises."""
    ports: set[int] = set()
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return ports, True
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return ports, True
        payload = offset + NLMSGHDR.size
        if kind == SOCK_DIAG_BY_FAMILY and length >= NLMSGHDR.size + SPORT_OFFSET + SPORT.size:
            (port,) = SPORT.unpack_from(data, payload + SPORT_OFFSET)
            if port:
                ports.add(port)
        offset += (length + 3) & ~3
    return ports, False


class SockDiag:
    """One netlink socket, reused for every dump."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self._sock.settimeout(2.0)
        self._seq = 0

    def ports(self, protocol: Protocol) -> frozenset[int]:
        found: set[int] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            self._seq += 1
            self._sock.send(request(family, protocol, self._seq))
            done = False
            while not done:
                ports, done = parse_ports(self._sock.recv(65536))
                found |= ports
        return frozenset(found)

    def close(self) -> None:
        self._sock.close()
