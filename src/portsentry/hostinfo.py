"""Facts about this host that must never be blocked: its addresses, gateways and DNS resolvers.

Addresses and routes come straight from the kernel over rtnetlink (no `ip` subprocess); the byte
parsing is pure and tolerant, so malformed or unexpected messages are skipped rather than fatal.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from portsentry.probe import IPAddress

# --- Wire format (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h), native byte order ---

NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
IFADDRMSG = struct.Struct("=BBBBI")  # ifa_family, ifa_prefixlen, ifa_flags, ifa_scope, ifa_index
# rtm_family, rtm_dst_len, rtm_src_len, rtm_tos, rtm_table, rtm_protocol, rtm_scope, rtm_type,
# rtm_flags
RTMSG = struct.Struct("=BBBBBBBBI")
RTATTR = struct.Struct("=HH")  # rta_len, rta_type
RTNEXTHOP = struct.Struct("=HBBi")  # rtnh_len, rtnh_flags, rtnh_hops, rtnh_ifindex
RTVIA_FAMILY = struct.Struct("=H")  # struct rtvia starts with the gateway's family

NLMSG_ALIGNTO = 4
RTA_ALIGNTO = 4
RTNH_ALIGNTO = 4

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26

NLM_F_REQUEST = 0x1
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4

RTA_DST = 1
RTA_GATEWAY = 5
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18

RT_TABLE_MAIN = 254
RTN_UNICAST = 1

_ADDRESS_SIZES: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}
_RECV_BUFFER = 1 << 17  # kernel dump skbs are at most ~32 KiB; leave generous room
_DUMP_ATTEMPTS = 3
_DUMP_TIMEOUT = 5.0  # seconds; the kernel answers at once, this only guards against a hang


def _align(length: int, alignment: int) -> int:
    return (length + alignment - 1) & ~(alignment - 1)


# --- Pure parsing: bytes in, records out, nothing raises on bad input ---


@dataclass(frozen=True)
class NetlinkMessage:
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


@dataclass(frozen=True)
class InterfaceAddress:
    """One RTM_NEWADDR: `local` is this host's address (IFA_LOCAL, else IFA_ADDRESS)."""

    family: int
    prefixlen: int
    index: int
    local: IPAddress | None
    broadcast: IPv4Address | None


@dataclass(frozen=True)
class Route:
    """One RTM_NEWROUTE, reduced to what gateway discovery needs."""

    family: int
    dst_len: int
    table: int
    type: int
    gateways: tuple[IPAddress, ...]

    @property
    def is_default(self) -> bool:
        return self.dst_len == 0 and self.table == RT_TABLE_MAIN and self.type == RTN_UNICAST


def parse_messages(data: bytes) -> list[NetlinkMessage]:
    """Split a netlink datagram into messages; stops at the first header that does not fit."""
    messages: list[NetlinkMessage] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, seq, pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        payload = data[offset + NLMSGHDR.size : offset + length]
        messages.append(NetlinkMessage(kind, flags, seq, pid, payload))
        offset += _align(length, NLMSG_ALIGNTO)
    return messages


def iter_attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield (rta_type, value) from `offset` on; stops at the first attribute that does not fit."""
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > len(data):
            return
        yield kind, data[offset + RTATTR.size : offset + length]
        offset += _align(length, RTA_ALIGNTO)


def _address(family: int, value: bytes) -> IPAddress | None:
    size = _ADDRESS_SIZES.get(family)
    if size is None or len(value) < size:
        return None
    raw = value[:size]
    return IPv4Address(raw) if family == socket.AF_INET else IPv6Address(raw)


def parse_addr_message(payload: bytes) -> InterfaceAddress | None:
    """Decode the body of one RTM_NEWADDR; None if it is too short or of another family."""
    if len(payload) < IFADDRMSG.size:
        return None
    family, prefixlen, _flags, _scope, index = IFADDRMSG.unpack_from(payload)
    if family not in _ADDRESS_SIZES:
        return None
    attributes: dict[int, IPAddress | None] = {}
    for kind, value in iter_attributes(payload, _align(IFADDRMSG.size, NLMSG_ALIGNTO)):
        if kind in (IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST):
            attributes[kind] = _address(family, value)
    # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is always ours when present.
    local = attributes.get(IFA_LOCAL)
    if local is None:
        local = attributes.get(IFA_ADDRESS)
    broadcast = attributes.get(IFA_BROADCAST)
    return InterfaceAddress(
        family=family,
        prefixlen=prefixlen,
        index=index,
        local=local,
        broadcast=broadcast if isinstance(broadcast, IPv4Address) else None,
    )


def _via(value: bytes) -> IPAddress | None:
    """RTA_VIA (struct rtvia): a gateway whose family differs from the route's (IPv4 via IPv6)."""
    if len(value) < RTVIA_FAMILY.size:
        return None
    (family,) = RTVIA_FAMILY.unpack_from(value)
    return _address(family, value[RTVIA_FAMILY.size :])


def _gateway(family: int, kind: int, value: bytes) -> IPAddress | None:
    if kind == RTA_GATEWAY:
        return _address(family, value)
    if kind == RTA_VIA:
        return _via(value)
    return None


def _multipath_gateways(family: int, value: bytes) -> list[IPAddress]:
    """Gateways of an RTA_MULTIPATH: a run of rtnexthop records, each with nested attributes."""
    gateways: list[IPAddress] = []
    offset = 0
    while offset + RTNEXTHOP.size <= len(value):
        length = RTNEXTHOP.unpack_from(value, offset)[0]
        if length < RTNEXTHOP.size or offset + length > len(value):
            break
        hop = value[offset : offset + length]
        for kind, nested in iter_attributes(hop, RTNEXTHOP.size):
            gateway = _gateway(family, kind, nested)
            if gateway is not None:
                gateways.append(gateway)
        offset += _align(length, RTNH_ALIGNTO)
    return gateways


def parse_route_message(payload: bytes) -> Route | None:
    """Decode the body of one RTM_NEWROUTE; None if it is too short or of another family."""
    if len(payload) < RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, _proto, _scope, kind, _flags = RTMSG.unpack_from(payload)
    if family not in _ADDRESS_SIZES:
        return None
    gateways: list[IPAddress] = []
    for attribute, value in iter_attributes(payload, _align(RTMSG.size, NLMSG_ALIGNTO)):
        if attribute == RTA_TABLE and len(value) >= 4:
            # Tables above 255 only fit here; rtm_table then says RT_TABLE_COMPAT.
            table = struct.unpack_from("=I", value)[0]
        elif attribute == RTA_MULTIPATH:
            gateways.extend(_multipath_gateways(family, value))
        else:
            gateway = _gateway(family, attribute, value)
            if gateway is not None:
                gateways.append(gateway)
    return Route(family, dst_len, table, kind, tuple(gateways))


def parse_addr_messages(data: bytes) -> list[InterfaceAddress]:
    """Every RTM_NEWADDR in a datagram (other message types are skipped)."""
    messages = parse_messages(data)
    parsed = (parse_addr_message(m.payload) for m in messages if m.type == RTM_NEWADDR)
    return [address for address in parsed if address is not None]


def parse_route_messages(data: bytes) -> list[Route]:
    """Every RTM_NEWROUTE in a datagram (other message types are skipped)."""
    messages = parse_messages(data)
    parsed = (parse_route_message(m.payload) for m in messages if m.type == RTM_NEWROUTE)
    return [route for route in parsed if route is not None]


def parse_resolv_conf(text: str) -> frozenset[IPAddress]:
    """`nameserver` addresses from resolv.conf text; junk lines and zone ids are ignored."""
    resolvers: set[IPAddress] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        text_address = fields[1].partition("%")[0]
        try:
            resolvers.add(IPv4Address(text_address))
        except ValueError:
            try:
                resolvers.add(IPv6Address(text_address))
            except ValueError:
                continue
    return frozenset(resolvers)


# --- The I/O shell: one dump request per question ---


def _dump(request_type: int, body: bytes) -> list[bytes]:
    """Run one NETLINK_ROUTE dump; returns the datagrams. Raises OSError if the kernel refuses."""
    # A dump racing an address/route change is flagged; ask again for a consistent view, but
    # settle for the last (merely possibly stale) answer rather than fail.
    for _attempt in range(_DUMP_ATTEMPTS - 1):
        datagrams, interrupted = _dump_once(request_type, body)
        if not interrupted:
            return datagrams
    return _dump_once(request_type, body)[0]


def _dump_once(request_type: int, body: bytes) -> tuple[list[bytes], bool]:
    seq = int.from_bytes(os.urandom(4), "little") or 1
    header = NLMSGHDR.pack(
        NLMSGHDR.size + len(body), request_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
    )
    datagrams: list[bytes] = []
    interrupted = False
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.settimeout(_DUMP_TIMEOUT)
        sock.bind((0, 0))
        sock.sendto(header + body, (0, 0))
        while True:
            data = sock.recv(_RECV_BUFFER)
            if not data:
                raise OSError(errno.EIO, "netlink socket closed during dump")
            done = False
            for message in parse_messages(data):
                if message.seq != seq:
                    continue
                interrupted |= bool(message.flags & NLM_F_DUMP_INTR)
                if message.type == NLMSG_DONE:
                    done = True
                elif message.type == NLMSG_ERROR and len(message.payload) >= 4:
                    code = -struct.unpack_from("=i", message.payload)[0]
                    if code:
                        raise OSError(code, f"netlink dump failed: {os.strerror(code)}")
                    done = True
            datagrams.append(data)
            if done:
                return datagrams, interrupted


def interface_addresses() -> list[InterfaceAddress]:
    """Every address on every interface, both families (RTM_GETADDR dump)."""
    request = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return [a for data in _dump(RTM_GETADDR, request) for a in parse_addr_messages(data)]


def routes() -> list[Route]:
    """Every route in every table, both families (RTM_GETROUTE dump)."""
    request = RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
    return [r for data in _dump(RTM_GETROUTE, request) for r in parse_route_messages(data)]


def local_addresses() -> frozenset[IPAddress]:
    """This host's own addresses, loopback included even when `lo` is down."""
    found: set[IPAddress] = {IPv4Address("127.0.0.1"), IPv6Address("::1")}
    found.update(a.local for a in interface_addresses() if a.local is not None)
    return frozenset(found)


def broadcast_addresses() -> frozenset[IPv4Address]:
    """Broadcast addresses of this host's IPv4 networks, plus the limited broadcast."""
    return subnet_broadcasts(interface_addresses())


def subnet_broadcasts(addresses: Iterable[InterfaceAddress]) -> frozenset[IPv4Address]:
    """The limited broadcast, every IFA_BROADCAST, and each subnet's all-ones address computed
    from its prefix: `ip addr add a.b.c.d/24` without `brd` sets no IFA_BROADCAST, yet the
    kernel still answers that subnet's directed broadcast, so a packet "from" it is forged."""
    found: set[IPv4Address] = {IPv4Address("255.255.255.255")}
    for address in addresses:
        if address.broadcast is not None:
            found.add(address.broadcast)
        if isinstance(address.local, IPv4Address) and address.prefixlen <= 30:
            host_bits = 32 - address.prefixlen
            found.add(IPv4Address(int(address.local) | ((1 << host_bits) - 1)))
    return frozenset(found)


def default_gateways() -> frozenset[IPAddress]:
    """Next hops of the main table's default routes, multipath hops included."""
    return frozenset(gw for route in routes() if route.is_default for gw in route.gateways)


def dns_resolvers(resolv_conf: str = "/etc/resolv.conf") -> frozenset[IPAddress]:
    """The configured DNS resolvers; a missing resolv.conf means none."""
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except FileNotFoundError:
        return frozenset()
    return parse_resolv_conf(text)
