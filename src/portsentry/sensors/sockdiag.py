"""Listening TCP and bound UDP ports straight from the kernel (NETLINK_SOCK_DIAG, as `ss -l` does).

Reading /proc/net/tcp makes the kernel walk every bucket of the TCP hash table (2-5 ms even
on an idle host); an inet_diag dump asking only for LISTEN sockets walks the listening table,
which is tiny, so the stealth sensor can afford to check before every new hit.
"""

from __future__ import annotations

import socket
import struct

from portsentry.core.probe import Protocol
from portsentry.netlink.codec import (
    NETLINK_SOCK_DIAG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    dump,
    message,
    open_socket,
    split,
)
from portsentry.netlink.codec import NLMSG_DONE as NLMSG_DONE
from portsentry.netlink.codec import NLMSGHDR as NLMSGHDR

SOCK_DIAG_BY_FAMILY = 20
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF
RECV_SIZE = 65536

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
    return message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def _port(data: bytes, start: int, end: int) -> int:
    """The local port of the inet_diag_msg in data[start:end]; 0 if it is too short to say."""
    if end - start < SPORT_OFFSET + SPORT.size:
        return 0
    port: int = SPORT.unpack_from(data, start + SPORT_OFFSET)[0]
    return port


def parse_ports(data: bytes) -> tuple[set[int], bool]:
    """Local ports in one netlink reply buffer, and whether the dump is complete. Never raises."""
    ports: set[int] = set()
    spans, stop = split(data)
    for kind, _flags, _seq, _pid, start, end in spans:
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return ports, True
        if kind == SOCK_DIAG_BY_FAMILY:
            port = _port(data, start, end)
            if port:
                ports.add(port)
    # A header whose length cannot be trusted ends the dump too: nothing after it can be read.
    return ports, stop + NLMSGHDR.size <= len(data)


class SockDiag:
    """One netlink socket, reused for every dump."""

    def __init__(self) -> None:
        self._sock = open_socket(NETLINK_SOCK_DIAG)
        self._sock.settimeout(2.0)
        self._seq = 0

    def ports(self, protocol: Protocol) -> frozenset[int]:
        """Raises OSError if the kernel refuses the dump (no udp_diag, say) or does not answer."""
        found: set[int] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            self._seq += 1
            replies, _interrupted = dump(self._sock, request(family, protocol, self._seq), self._seq,
                                         RECV_SIZE)
            for reply in replies:
                port = _port(reply.payload, 0, len(reply.payload))
                if port and reply.type == SOCK_DIAG_BY_FAMILY:
                    found.add(port)
        return frozenset(found)

    def close(self) -> None:
        self._sock.close()
