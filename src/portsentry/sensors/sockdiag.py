"""Listening TCP and bound UDP ports straight from the kernel (NETLINK_SOCK_DIAG, as `ss -l` does).

Reading /proc/net/tcp makes the kernel walk every bucket of the TCP hash table (2-5 ms even
on an idle host); an inet_diag dump asking only for LISTEN sockets walks the listening table,
which is tiny, so the stealth sensor can afford to check before every new hit.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from portsentry.core.probe import Protocol
from portsentry.netlink.codec import (
    NETLINK_SOCK_DIAG,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    attr,
    dump,
    error_reply,
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


INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
BC_OP = struct.Struct("=BBH")  # inet_diag_bc_op: code, yes, no (jumps in bytes)


def request(family: int, protocol: Protocol, seq: int, port: int | None = None) -> bytes:
    """A dump of the listening TCP (or bound UDP) sockets of `family`; with `port`, only those
    on that local port (the kernel filters, so the answer is empty or tiny)."""
    proto = socket.IPPROTO_TCP if protocol is Protocol.TCP else socket.IPPROTO_UDP
    states = 1 << TCP_LISTEN if protocol is Protocol.TCP else ALL_STATES
    body = INET_DIAG_REQ_V2.pack(family, proto, 0, states)
    if port is not None:
        body += attr(INET_DIAG_REQ_BYTECODE, port_filter(port))
    return message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


TCPDIAG_GETSOCK = 18
# inet_diag_req, the request before sock_diag: family, src_len, dst_len, ext, sockid, states, dbs.
INET_DIAG_REQ_V1 = struct.Struct("=BBBB48xII")


def tcp_request_any_family(seq: int, port: int) -> bytes:
    """Listening TCP sockets of both families on `port`, in one dump (family 0: the kernel
    walks its listening table once instead of once per family)."""
    body = (INET_DIAG_REQ_V1.pack(0, 0, 0, 0, 1 << TCP_LISTEN, 0)
            + attr(INET_DIAG_REQ_BYTECODE, port_filter(port)))
    return message(TCPDIAG_GETSOCK, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


# inet_diag_sockid as the exact request fills it: sport, dport, src, dst (network order), then
# the interface (0: any) and the cookie (all ones: none asked for).
EXACT_SOCKID = struct.Struct("!HH16s16sIII")
EXACT_HEAD = struct.Struct("=BBBxI")  # inet_diag_req_v2 before its sockid
NO_COOKIE = 0xFFFFFFFF


def exact_request(protocol: Protocol, local: bytes, local_port: int, remote: bytes, remote_port: int,
                  seq: int) -> bytes:
    """The kernel's own socket lookup for one packet (no NLM_F_DUMP): is there a socket that
    would take a packet from remote:remote_port to local:local_port, a listener or a connection?
    Addresses are packed, 4 or 16 bytes. The answer is one message, or ENOENT."""
    family = socket.AF_INET if len(local) == 4 else socket.AF_INET6
    proto = socket.IPPROTO_TCP if protocol is Protocol.TCP else socket.IPPROTO_UDP
    if protocol is Protocol.UDP:
        # udp_diag reads src as the packet's source and dst as ours ("src and dst are swapped
        # for historical reasons", net/ipv4/udp_diag.c); inet_diag the other way round.
        local, local_port, remote, remote_port = remote, remote_port, local, local_port
    body = EXACT_HEAD.pack(family, proto, 0, ALL_STATES) + EXACT_SOCKID.pack(
        local_port, remote_port, local.ljust(16, b"\0"), remote.ljust(16, b"\0"), 0, NO_COOKIE, NO_COOKIE)
    return message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, body)


def port_filter(port: int) -> bytes:
    """inet_diag bytecode for sport >= port and sport <= port. Each comparison is an op followed
    by one holding the port; a true op jumps to the next (8 bytes on), a false one past the end
    (4 bytes beyond it), which the kernel takes as "no match". Port comparisons need no
    privilege (only mark and cgroup conditions do)."""
    length = 2 * 2 * BC_OP.size
    return (BC_OP.pack(INET_DIAG_BC_S_GE, 2 * BC_OP.size, length + 4) + BC_OP.pack(0, 0, port)
            + BC_OP.pack(INET_DIAG_BC_S_LE, 2 * BC_OP.size, length // 2 + 4) + BC_OP.pack(0, 0, port))


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
        self._both_families = True  # until the kernel refuses tcp_request_any_family
        self._exact = True  # until the kernel refuses exact_request

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

    def holds(self, protocol: Protocol, port: int) -> bool:
        """Has any socket of either family this local port (TCP: listening)? A dump filtered to
        the port, read without the generic dump walk: this is on the way to a detection line.
        TCP asks both families in one walk of the kernel's listening table (the inet_diag
        request of before sock_diag, which the kernel still serves with the family unset);
        UDP, and TCP where that is refused, one dump per family. Raises OSError as `ports`."""
        if protocol is Protocol.TCP and self._both_families:
            self._seq += 1
            try:
                return self._ask(tcp_request_any_family(self._seq, port), self._seq, TCPDIAG_GETSOCK, port)
            except OSError as error:
                if error.errno not in (errno.EINVAL, errno.ENOENT, errno.EOPNOTSUPP):
                    raise
                self._both_families = False
        for family in (socket.AF_INET, socket.AF_INET6):
            self._seq += 1
            if self._ask(request(family, protocol, self._seq, port), self._seq, SOCK_DIAG_BY_FAMILY, port):
                return True
        return False

    def takes(self, protocol: Protocol, local: bytes, local_port: int, remote: bytes,
              remote_port: int) -> bool:
        """Would a socket here take this packet (the kernel's lookup for it: a listener on the
        address it was sent to or on any, or a connection of that peer)? One request and one
        answer, a few microseconds: this is on the way to a detection line. A kernel without
        exact requests is asked `holds` instead, from then on. Raises OSError as `ports`."""
        if self._exact:
            self._seq += 1
            seq = self._seq
            self._sock.send(exact_request(protocol, local, local_port, remote, remote_port, seq))
            while True:
                data = self._sock.recv(RECV_SIZE)
                if not data:
                    raise OSError(errno.EIO, "netlink socket closed during a request")
                for kind, _flags, answered, _pid, start, end in split(data)[0]:
                    if answered != seq:
                        continue  # left over from a request that raised before its answer
                    if kind == SOCK_DIAG_BY_FAMILY:
                        return True
                    if kind != NLMSG_ERROR:
                        continue
                    reply = error_reply(data, start, end)
                    code = errno.EBADMSG if reply is None else reply[1]
                    if code == errno.ENOENT:
                        return False
                    if code not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise OSError(code, f"sock_diag request refused: {os.strerror(code)}")
                    self._exact = False
                    return self.holds(protocol, local_port)
        return self.holds(protocol, local_port)

    def _ask(self, request: bytes, seq: int, reply_type: int, port: int) -> bool:
        """Send one filtered dump request and read its answer to the end (so the socket is free
        for the next); whether a socket on `port` was in it."""
        self._sock.send(request)
        found = False
        while True:
            data = self._sock.recv(RECV_SIZE)
            if not data:
                raise OSError(errno.EIO, "netlink socket closed during a dump")
            spans, stop = split(data)
            if stop < len(data):
                raise OSError(errno.EBADMSG, "malformed sock_diag reply")
            for kind, _flags, answered, _pid, start, end in spans:
                if answered != seq:
                    continue
                if kind == reply_type:
                    found |= _port(data, start, end) == port
                    continue
                if kind == NLMSG_ERROR:
                    reply = error_reply(data, start, end)
                    code = errno.EBADMSG if reply is None else reply[1]
                    if code:
                        raise OSError(code, f"sock_diag dump refused: {os.strerror(code)}")
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return found

    def close(self) -> None:
        self._sock.close()
