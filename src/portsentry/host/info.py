"""Facts about this host that must never be blocked: its addresses, gateways and DNS resolvers.

Addresses and routes come straight from the kernel over rtnetlink (no `ip` subprocess); the byte
parsing is pure and tolerant, so malformed or unexpected messages are skipped rather than fatal.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from portsentry.core.addresses import canonical
from portsentry.core.probe import IPAddress
from portsentry.netlink.codec import (
    NETLINK_ROUTE,
    NLATTR,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    Message,
    align,
    attr,
    attributes,
    dump,
    message,
    messages,
    open_socket,
)
from portsentry.netlink.codec import NLMSG_DONE as NLMSG_DONE
from portsentry.netlink.codec import NLMSGHDR as NLMSGHDR

# --- rtnetlink's bodies (linux/rtnetlink.h, linux/if_addr.h), native byte order; the netlink
# framing is portsentry.netlink's ---

IFADDRMSG = struct.Struct("=BBBBI")  # ifa_family, ifa_prefixlen, ifa_flags, ifa_scope, ifa_index
# rtm_family, rtm_dst_len, rtm_src_len, rtm_tos, rtm_table, rtm_protocol, rtm_scope, rtm_type,
# rtm_flags
RTMSG = struct.Struct("=BBBBBBBBI")
RTATTR = NLATTR  # struct rtattr: rta_len, rta_type, as struct nlattr
RTNEXTHOP = struct.Struct("=HBBi")  # rtnh_len, rtnh_flags, rtnh_hops, rtnh_ifindex
RTVIA_FAMILY = struct.Struct("=H")  # struct rtvia starts with the gateway's family
IFINFOMSG = struct.Struct("=BxHiII")  # ifi_family, pad, ifi_type, ifi_index, ifi_flags, ifi_change

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4

RTA_DST = 1
RTA_GATEWAY = 5
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18

IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1  # nested in IFLA_LINKINFO
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 1 << 3  # most of a link's bytes, and nothing we read
# The one kind of master that does not hand its ports' packets up again as its own (l3mdev).
L3_MASTER_KINDS = frozenset({"vrf"})

RT_TABLE_MAIN = 254
RTN_UNICAST = 1

_ADDRESS_SIZES: dict[int, int] = {socket.AF_INET: 4, socket.AF_INET6: 16}
_ADDRESS_ATTRIBUTES = frozenset({IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST})
_RECV_BUFFER = 1 << 17  # kernel dump skbs are at most ~32 KiB; leave generous room
_DUMP_ATTEMPTS = 3
_DUMP_TIMEOUT = 5.0  # seconds; the kernel answers at once, this only guards against a hang


# --- Pure parsing: bytes in, records out, nothing raises on bad input ---

NetlinkMessage = Message  # one message of a dump, as portsentry.netlink splits them


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


@dataclass(frozen=True)
class Link:
    """One RTM_NEWLINK, reduced to what finding bridge and bond ports needs."""

    index: int
    master: int  # IFLA_MASTER, 0 for none
    kind: str  # IFLA_INFO_KIND ("bridge", "bond", "vrf", ...), "" for none


def parse_messages(data: bytes) -> list[NetlinkMessage]:
    """Split a netlink datagram into messages; stops at the first header that does not fit."""
    return messages(data)


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
    found: dict[int, IPAddress | None] = {}
    for kind, value in attributes(payload, align(IFADDRMSG.size), len(payload), _ADDRESS_ATTRIBUTES)[0]:
        found[kind] = _address(family, value)
    # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is always ours when present.
    local = found.get(IFA_LOCAL)
    if local is None:
        local = found.get(IFA_ADDRESS)
    broadcast = found.get(IFA_BROADCAST)
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
        for kind, nested in attributes(value, offset + RTNEXTHOP.size, offset + length)[0]:
            gateway = _gateway(family, kind, nested)
            if gateway is not None:
                gateways.append(gateway)
        offset += align(length)  # RTNH_ALIGN
    return gateways


def parse_route_message(payload: bytes) -> Route | None:
    """Decode the body of one RTM_NEWROUTE; None if it is too short or of another family."""
    if len(payload) < RTMSG.size:
        return None
    family, dst_len, _src, _tos, table, _proto, _scope, kind, _flags = RTMSG.unpack_from(payload)
    if family not in _ADDRESS_SIZES:
        return None
    gateways: list[IPAddress] = []
    for attribute, value in attributes(payload, align(RTMSG.size))[0]:
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


def parse_link_message(payload: bytes) -> Link | None:
    """Decode the body of one RTM_NEWLINK; None if it is too short for struct ifinfomsg."""
    if len(payload) < IFINFOMSG.size:
        return None
    index = IFINFOMSG.unpack_from(payload)[2]
    master, kind = 0, ""
    wanted = (IFLA_MASTER, IFLA_LINKINFO)
    for attribute, value in attributes(payload, IFINFOMSG.size, len(payload), wanted)[0]:
        if attribute == IFLA_MASTER and len(value) >= 4:
            master = struct.unpack_from("=I", value)[0]
        elif attribute == IFLA_LINKINFO:
            for _inner, text in attributes(value, 0, len(value), (IFLA_INFO_KIND,))[0]:
                kind = text.split(b"\0", 1)[0].decode("ascii", "replace")
    return Link(index, master, kind)


def relaying_ports(links: Iterable[Link]) -> frozenset[int]:
    """Interfaces enslaved to a bridge, bond, team or Open vSwitch: their master takes each
    frame they receive for this host and receives it again as its own, so a packet tap sees it
    on both (an interface whose master is not in `links` counts as such a port too)."""
    found = list(links)
    kinds = {link.index: link.kind for link in found}
    return frozenset(link.index for link in found
                     if link.master and kinds.get(link.master, "") not in L3_MASTER_KINDS)


def parse_link_messages(data: bytes) -> list[Link]:
    """Every RTM_NEWLINK in a datagram (other message types are skipped)."""
    return _links(messages(data))


def parse_addr_messages(data: bytes) -> list[InterfaceAddress]:
    """Every RTM_NEWADDR in a datagram (other message types are skipped)."""
    return _addresses(messages(data))


def parse_route_messages(data: bytes) -> list[Route]:
    """Every RTM_NEWROUTE in a datagram (other message types are skipped)."""
    return _routes(messages(data))


def _addresses(found: Iterable[Message]) -> list[InterfaceAddress]:
    parsed = (parse_addr_message(m.payload) for m in found if m.type == RTM_NEWADDR)
    return [address for address in parsed if address is not None]


def _links(found: Iterable[Message]) -> list[Link]:
    parsed = (parse_link_message(m.payload) for m in found if m.type == RTM_NEWLINK)
    return [link for link in parsed if link is not None]


def _routes(found: Iterable[Message]) -> list[Route]:
    parsed = (parse_route_message(m.payload) for m in found if m.type == RTM_NEWROUTE)
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
                # `::ffff:a.b.c.d` is the IPv4 resolver: every guard compares canonical forms.
                resolvers.add(canonical(IPv6Address(text_address)))
            except ValueError:
                continue
    return frozenset(resolvers)


# --- The I/O shell: one dump request per question ---


def _dump(request_type: int, body: bytes) -> list[Message]:
    """Run one NETLINK_ROUTE dump; returns its messages. Raises OSError if the kernel refuses."""
    # A dump racing an address/route change is flagged; ask again for a consistent view, but
    # settle for the last (merely possibly stale) answer rather than fail.
    for _attempt in range(_DUMP_ATTEMPTS - 1):
        found, interrupted = _dump_once(request_type, body)
        if not interrupted:
            return found
    return _dump_once(request_type, body)[0]


def _dump_once(request_type: int, body: bytes) -> tuple[list[Message], bool]:
    seq = int.from_bytes(os.urandom(4), "little") or 1
    with open_socket(NETLINK_ROUTE) as sock:
        sock.settimeout(_DUMP_TIMEOUT)
        sock.bind((0, 0))
        request = message(request_type, NLM_F_REQUEST | NLM_F_DUMP, seq, body)
        return dump(sock, request, seq, _RECV_BUFFER)


def interface_addresses() -> list[InterfaceAddress]:
    """Every address on every interface, both families (RTM_GETADDR dump)."""
    request = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _addresses(_dump(RTM_GETADDR, request))


def routes() -> list[Route]:
    """Every route in every table, both families (RTM_GETROUTE dump)."""
    request = RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
    return _routes(_dump(RTM_GETROUTE, request))


def links() -> list[Link]:
    """Every network interface (RTM_GETLINK dump, without the statistics)."""
    request = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(
        IFLA_EXT_MASK, struct.pack("=I", RTEXT_FILTER_SKIP_STATS))
    return _links(_dump(RTM_GETLINK, request))


def relaying_interfaces() -> frozenset[int]:
    """Indexes of the interfaces whose packets a tap sees again on their master (relaying_ports)."""
    return relaying_ports(links())


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
