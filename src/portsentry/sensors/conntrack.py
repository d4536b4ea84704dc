"""Was a packet's destination rewritten by NAT? Asked of conntrack (ctnetlink) for one flow.

A port this host publishes by DNAT (Docker's and Kubernetes' published ports without a userland
proxy) or REDIRECT (a transparent proxy) has no socket on the port the packet names: the kernel
rewrites the destination in prerouting and forwards the packet, or hands it to a socket on
another port. An AF_PACKET tap sees the packet before that, addressed to this host, and the
socket lookup finds nothing there, so every client of a published port under 1024 was taken for
a scanner in -atcp and banned. 1.2's raw sockets, and the NFLOG capture in the input hook, see
packets after NAT, so only the AF_PACKET capture asks this.

Asked only while this network namespace rewrites incoming destinations at all (`nat_in_use`: a
nat chain at the prerouting hook, nftables' or iptables-legacy's), checked every few seconds: a
question costs 20-150 us on the way to a lone probe's line, which a host without NAT must not
pay. A flow conntrack does not hold (ENOENT) is no NAT.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable

from portsentry.core import messages
from portsentry.core.probe import Protocol
from portsentry.netlink.codec import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NLA_HDRLEN,
    NLATTR,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    attr,
    attributes,
    dump_any,
    error_reply,
    nested,
    nf_message,
    open_socket,
    split,
)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET = 0, 1
CTA_TUPLE_ORIG, CTA_STATUS = 1, 3
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_DST_NAT = 1 << 5  # include/uapi/linux/netfilter/nf_conntrack_common.h
STATUS = struct.Struct("!I")
PORT = struct.Struct("!H")
RECV_SIZE = 8192
TIMEOUT = 0.5  # seconds; the kernel answers at once, this only bounds a surprise
BUDGET = 2000  # questions a second, as the listener check's: a flood cannot make this costly
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 3, 4
NFTA_CHAIN_HOOK, NFTA_CHAIN_TYPE = 4, 7
NFTA_HOOK_HOOKNUM = 1
NF_INET_PRE_ROUTING = 0
HOOKNUM = struct.Struct("!I")
NO_NFTABLES = (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.ENOENT)
# iptables-legacy lists the tables it has in this namespace here.
LEGACY_TABLES = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")


def nat_chain(payload: bytes) -> bool:
    """Whether one NFT_MSG_NEWCHAIN body (after nfgenmsg) is a nat chain at prerouting."""
    found, _clean = attributes(payload, NFGENMSG.size, len(payload), (NFTA_CHAIN_TYPE, NFTA_CHAIN_HOOK))
    kind = hook = None
    for attribute, value in found:
        if attribute == NFTA_CHAIN_TYPE:
            kind = value.split(b"\0", 1)[0]
        else:
            for _inner, number in attributes(value, 0, len(value), (NFTA_HOOK_HOOKNUM,))[0]:
                if len(number) >= HOOKNUM.size:
                    hook = HOOKNUM.unpack_from(number)[0]
    return kind == b"nat" and hook == NF_INET_PRE_ROUTING


def nat_in_use(legacy: tuple[str, ...] = LEGACY_TABLES) -> bool:
    """Whether this network namespace rewrites incoming destinations: an nftables nat chain at
    prerouting (iptables-nft's too), or iptables-legacy's nat table. Raises OSError when the
    kernel cannot be asked."""
    for path in legacy:
        try:
            with open(path, "rb") as handle:
                if b"nat" in handle.read().split():
                    return True
        except FileNotFoundError:
            continue
    request = nf_message(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETCHAIN, NLM_F_REQUEST | NLM_F_DUMP,
                         1, socket.AF_UNSPEC, 0)
    try:
        with contextlib.closing(open_socket(NETLINK_NETFILTER)) as sock:
            sock.settimeout(TIMEOUT)
            sock.send(request)
            return _nat_chain_in_dump(sock)
    except OSError as error:
        if error.errno in NO_NFTABLES:
            return False  # a kernel without nf_tables has no nft chains
        raise


# A chain's type attribute reading "nat": a datagram without it holds no nat chain. A host with
# thousands of chains (kube-proxy) is scanned in about 2 ms this way, 20 ms parsed message by
# message, and this runs on the packet loop every NAT_INTERVAL.
_NAT_TYPE = NLATTR.pack(NLA_HDRLEN + 4, NFTA_CHAIN_TYPE) + b"nat\0"


def _nat_chain_in_dump(sock: socket.socket) -> bool:
    """Read the chain dump answering request 1; True at the first nat chain at prerouting."""
    return dump_any(sock, 1, lambda kind, data, start, end: (
        kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWCHAIN and nat_chain(data[start:end])),
        "chain dump", worth_a_look=lambda data: _NAT_TYPE in data)


def get_request(protocol: Protocol, source: bytes, source_port: int, destination: bytes,
                destination_port: int, seq: int) -> bytes:
    """IPCTNL_MSG_CT_GET for the flow as it arrived (the original tuple); addresses packed."""
    v4 = len(source) == 4
    src_kind, dst_kind = (CTA_IP_V4_SRC, CTA_IP_V4_DST) if v4 else (CTA_IP_V6_SRC, CTA_IP_V6_DST)
    number = socket.IPPROTO_TCP if protocol is Protocol.TCP else socket.IPPROTO_UDP
    tuple_ = nested(
        CTA_TUPLE_ORIG,
        nested(CTA_TUPLE_IP, attr(src_kind, source), attr(dst_kind, destination)),
        nested(CTA_TUPLE_PROTO, attr(CTA_PROTO_NUM, bytes([number])),
               attr(CTA_PROTO_SRC_PORT, PORT.pack(source_port)),
               attr(CTA_PROTO_DST_PORT, PORT.pack(destination_port))),
    )
    family = socket.AF_INET if v4 else socket.AF_INET6
    return nf_message(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET, NLM_F_REQUEST, seq, family, 0, tuple_)


def parse_status(data: bytes, start: int, end: int) -> int | None:
    """CTA_STATUS of the conntrack entry in data[start:end] (after nfgenmsg); None if absent."""
    found, _stop = attributes(data, start + NFGENMSG.size, end, (CTA_STATUS,))
    for _kind, value in found:
        if len(value) >= STATUS.size:
            status: int = STATUS.unpack_from(value)[0]
            return status
    return None


class NatLookup:
    """One NETLINK_NETFILTER socket, opened on first use. Not thread-safe: the packet loop's."""

    def __init__(self, budget: int = BUDGET) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self.budget = budget
        self._second, self._left = -1, budget

    def rewritten(self, protocol: Protocol, source: bytes, source_port: int, destination: bytes,
                  destination_port: int, now: float) -> bool | None:
        """Whether conntrack holds this flow with its destination rewritten (DNAT, REDIRECT);
        None, without asking, past the budget of questions this second. Raises OSError when
        ctnetlink cannot be asked (not built, not permitted)."""
        if int(now) != self._second:
            self._second, self._left = int(now), self.budget
        if self._left <= 0:
            return None
        self._left -= 1
        if self._sock is None:
            sock = open_socket(NETLINK_NETFILTER)
            sock.settimeout(TIMEOUT)
            self._sock = sock
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(get_request(protocol, source, source_port, destination, destination_port, seq))
        while True:
            data = self._sock.recv(RECV_SIZE)
            if not data:
                raise OSError(errno.EIO, "netlink socket closed during a request")
            for kind, _flags, answered, _pid, start, end in split(data)[0]:
                if answered != seq:
                    continue  # left over from a request that raised before its answer
                if kind == NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW:
                    status = parse_status(data, start, end)
                    return status is not None and bool(status & IPS_DST_NAT)
                if kind != NLMSG_ERROR:
                    continue
                reply = error_reply(data, start, end)
                code = errno.EBADMSG if reply is None else reply[1]
                if code == errno.ENOENT:
                    return False
                raise OSError(code, f"conntrack request refused: {os.strerror(code)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# Seconds between looks for a nat chain: a container's published port is honoured this soon.
NAT_INTERVAL = 2.0
# Past the budget, a port whose flows were found rewritten this recently still counts as
# published; at most this many (protocol, address, port) are remembered.
PUBLISHED_MEMORY = 60.0
PUBLISHED_MAX = 4096
Logger = Callable[[str], None]


class PublishedPorts:
    """For a capture that sees packets before NAT (AF_PACKET): whether a probe's flow was NATed
    to a service. `active` only in a namespace with a nat chain at prerouting, looked for every
    NAT_INTERVAL by `refresh`; a kernel that cannot be asked is said once and not asked again.
    Past the lookup's budget, the ports seen published in the last PUBLISHED_MEMORY seconds answer."""

    def __init__(self, log: Logger, lookup: NatLookup | None = None,
                 query: Callable[[], bool] = nat_in_use) -> None:
        self._log = log
        self._lookup: NatLookup | None = lookup if lookup is not None else NatLookup()
        self._query = query
        self.active = False
        self._checked: float | None = None
        # (protocol, destination, port) -> when a flow to it was last found rewritten.
        self._seen: dict[tuple[Protocol, bytes, int], float] = {}

    def refresh(self, now: float, before_nat: bool) -> None:
        if not before_nat or self._lookup is None:
            self.active = False
            return
        last = self._checked
        if last is not None and 0 <= now - last < NAT_INTERVAL:
            return
        self._checked = now
        try:
            self.active = self._query()
        except OSError as error:
            self._unusable(error)

    def rewritten(self, protocol: Protocol, source: bytes, source_port: int, destination: bytes,
                  destination_port: int, now: float) -> bool:
        if self._lookup is None:
            return False
        try:
            answer = self._lookup.rewritten(protocol, source, source_port, destination, destination_port, now)
        except OSError as error:
            self._unusable(error)
            return False
        if answer is None:
            # Past the budget (a flood of probes to unserved ports, forged sources among them):
            # "not rewritten" would make every client of a published port a scanner until the
            # next second. As the listener check falls back to its table, this falls back to
            # the ports seen published.
            seen = self._seen.get((protocol, destination, destination_port))
            return seen is not None and 0 <= now - seen < PUBLISHED_MEMORY
        if answer:
            key = (protocol, destination, destination_port)
            if key not in self._seen and len(self._seen) >= PUBLISHED_MAX:
                self._seen.clear()
            self._seen[key] = now
        return answer

    def _unusable(self, error: OSError) -> None:
        if self._lookup is not None:
            self._lookup.close()
        self._lookup, self.active = None, False
        self._log(messages.config_error(
            f"cannot ask the kernel whether a port is published by NAT ({error}): clients of ports "
            f"forwarded by DNAT may be taken for scanners (the NFLOG capture of BAN_BACKEND=nftables "
            f"sees packets after NAT)"))

    def close(self) -> None:
        if self._lookup is not None:
            self._lookup.close()
