"""Parse captured IPv4/IPv6 packets into `Packet` records and classify TCP flag sets as 1.2 does.

Input is what an AF_PACKET SOCK_DGRAM socket delivers: bytes starting at the IP header. This is
the packet sensor's hot path and it reads untrusted bytes, so it never raises and drops anything
malformed with a counted reason.
"""

from __future__ import annotations

import enum
import struct
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from portsentry.core.addresses import BadSource, canonical, impossible_source
from portsentry.core.probe import (
    KIND_FIN,
    KIND_NULL,
    KIND_SYN,
    KIND_XMAS,
    IPAddress,
    Protocol,
)

IPPROTO_HOPOPTS = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60

# IPv6 extension headers walked to find the transport header. The fragment header (44) is not
# here on purpose: only the first fragment holds the transport header, and trusting it invites
# the overlapping-fragment tricks that IPv4 non-first fragments allow.
IPV6_EXTENSION_HEADERS = frozenset({IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_AH})
# Headers after hop-by-hop (which the kernel parses apart) that Linux walks before it discards the
# packet (IP6_MAX_EXT_HDRS_CNT): a longer limit reads chains no socket gets, a shorter one let a
# scan behind 9 to 12 headers go unseen while the kernel answered it.
IPV6_EXTENSION_LIMIT = 12


class IPv4Header:
    """RFC 791 fixed header: version/IHL, TOS, total length, id, flags/fragment, TTL, protocol,
    checksum, source, destination."""

    LAYOUT = struct.Struct("!BBHHHBBH4s4s")
    SIZE = LAYOUT.size  # 20
    VERSION_IHL = 0
    TOTAL_LENGTH = 2
    FLAGS_FRAGMENT = 6
    PROTOCOL = 9
    SOURCE = 12
    DESTINATION = 16
    FRAGMENT_OFFSET_MASK = 0x1FFF
    MORE_FRAGMENTS = 0x2000


class IPv6Header:
    """RFC 8200 fixed header: version/class/flow label, payload length, next header, hop limit,
    source, destination."""

    LAYOUT = struct.Struct("!IHBB16s16s")
    SIZE = LAYOUT.size  # 40
    VERSION_CLASS_FLOW = 0
    PAYLOAD_LENGTH = 4
    NEXT_HEADER = 6
    SOURCE = 8
    DESTINATION = 24


class IPv6ExtensionHeader:
    """The two bytes every walked extension header starts with: next header and length.

    Length is in 8-byte units not counting the first 8, except AH (RFC 4302): 4-byte units not
    counting the first 8."""

    LAYOUT = struct.Struct("!BB")
    SIZE = LAYOUT.size


class TcpHeader:
    """RFC 9293 fixed header: ports, sequence, acknowledgment, data offset, flags, window,
    checksum, urgent pointer."""

    LAYOUT = struct.Struct("!HHIIBBHHH")
    SIZE = LAYOUT.size  # 20
    SOURCE_PORT = 0
    DESTINATION_PORT = 2
    DATA_OFFSET = 12
    FLAGS = 13


class UdpHeader:
    """RFC 768 header: ports, length, checksum."""

    LAYOUT = struct.Struct("!HHHH")
    SIZE = LAYOUT.size  # 8
    SOURCE_PORT = 0
    DESTINATION_PORT = 2


class TcpFlag(enum.IntFlag):
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


class DropReason(enum.StrEnum):
    TRUNCATED = "truncated"
    BAD_VERSION = "bad IP version"
    BAD_IHL = "bad IPv4 header length"
    BAD_LENGTH = "bad IP length field"
    FRAGMENT = "fragment"
    NOT_TCP_UDP = "not TCP or UDP"
    IPV6_EXT_LIMIT = "too many IPv6 extension headers"
    IPV6_EXT_ORDER = "IPv6 hop-by-hop header not first"
    BAD_TCP_OFFSET = "bad TCP data offset"
    # Sources no real peer can have (addresses.BadSource): forged, dropped before the engine.
    SOURCE_UNSPECIFIED = "source unspecified"
    SOURCE_LOOPBACK = "source loopback"
    SOURCE_MULTICAST = "source multicast"
    SOURCE_BROADCAST = "source broadcast"
    SOURCE_RESERVED = "source reserved"
    # An IPv6 packet "from" ::ffff:a.b.c.d or ::a.b.c.d: no IPv4 host sends one.
    SOURCE_IPV4_IN_IPV6 = "source IPv4 in IPv6"


BAD_SOURCE_DROPS = {
    BadSource.UNSPECIFIED: DropReason.SOURCE_UNSPECIFIED,
    BadSource.LOOPBACK: DropReason.SOURCE_LOOPBACK,
    BadSource.MULTICAST: DropReason.SOURCE_MULTICAST,
    BadSource.BROADCAST: DropReason.SOURCE_BROADCAST,
    BadSource.RESERVED: DropReason.SOURCE_RESERVED,
}


class DropCounter:
    """How many packets were dropped, per reason; one per sensor, reported in its statistics."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: Counter[DropReason] = Counter()

    def add(self, reason: DropReason) -> None:
        self._counts[reason] += 1

    def __getitem__(self, reason: DropReason) -> int:
        return self._counts[reason]

    @property
    def total(self) -> int:
        return self._counts.total()

    def as_dict(self) -> dict[str, int]:
        return {str(reason): count for reason, count in self._counts.items()}


@dataclass(frozen=True, slots=True)
class Packet:
    """One TCP segment or UDP datagram header as captured; `ip_options` is IPv4 IHL > 5."""

    source: IPAddress
    destination: IPAddress
    protocol: Protocol
    source_port: int
    destination_port: int
    tcp_flags: TcpFlag
    ip_options: bool


_NO_FLAGS = TcpFlag(0)
# IntFlag construction is slow; all 256 values are made once so the hot path only indexes.
_FLAG_VALUES = tuple(TcpFlag(value) for value in range(256))


def parse_packet(data: bytes, drops: DropCounter) -> Packet | None:
    """The TCP/UDP header of an IP packet, or None (reason counted in `drops`). Never raises.

    Addresses come out canonical (an IPv4-mapped destination as IPv4), and a packet whose source
    no real peer can have, an IPv4 address in an IPv6 header among them, is dropped here, so
    nothing after the parser ever sees one.
    """
    if not data:
        drops.add(DropReason.TRUNCATED)
        return None
    version = data[0] >> 4
    if version == 4:
        packet = _parse_ipv4(data, drops)
    elif version == 6:
        packet = _parse_ipv6(data, drops)
    else:
        drops.add(DropReason.BAD_VERSION)
        return None
    if packet is not None and (bad := impossible_source(packet.source)) is not None:
        drops.add(BAD_SOURCE_DROPS[bad])
        return None
    return packet


def _parse_ipv4(data: bytes, drops: DropCounter) -> Packet | None:
    if len(data) < IPv4Header.SIZE:
        drops.add(DropReason.TRUNCATED)
        return None
    (version_ihl, _, total_length, _, flags_fragment, _, protocol, _, source, destination) = (
        IPv4Header.LAYOUT.unpack_from(data)
    )
    header_length = (version_ihl & 0x0F) * 4
    if header_length < IPv4Header.SIZE:
        drops.add(DropReason.BAD_IHL)
        return None
    if total_length < header_length:
        drops.add(DropReason.BAD_LENGTH)
        return None
    # Non-first fragments carry payload where the transport header would be; 1.2 and 2.x
    # read ports and flags out of it, which lets anyone forge a "probe" past a firewall.
    if flags_fragment & IPv4Header.FRAGMENT_OFFSET_MASK:
        drops.add(DropReason.FRAGMENT)
        return None
    # The capture may be shorter than total_length (snap length) or longer (link padding).
    end = min(total_length, len(data))
    transport = _parse_transport(data, header_length, end, total_length, protocol, drops)
    if transport is None:
        return None
    proto, source_port, destination_port, flags = transport
    return Packet(
        IPv4Address(source),
        IPv4Address(destination),
        proto,
        source_port,
        destination_port,
        flags,
        header_length > IPv4Header.SIZE,
    )


# The first 96 bits of an IPv4-mapped (::ffff:0:0/96) and an IPv4-compatible (::/96) address;
# :: and ::1 are IPv6's own, the unspecified and loopback addresses, dropped as such.
_IPV4_MAPPED, _IPV4_COMPATIBLE = bytes(10) + b"\xff\xff", bytes(12)
_OWN_IPV6_LOW = frozenset({bytes(4), bytes(3) + b"\x01"})

# IPv6 fragment header: next header, reserved, fragment offset (13 bits) + flags, identification.
_FRAGMENT = struct.Struct("!BBH")


def _parse_ipv6(data: bytes, drops: DropCounter) -> Packet | None:
    if len(data) < IPv6Header.SIZE:
        drops.add(DropReason.TRUNCATED)
        return None
    _, payload_length, next_header, _, source, destination = IPv6Header.LAYOUT.unpack_from(data)
    prefix = source[:12]
    if prefix == _IPV4_MAPPED or (prefix == _IPV4_COMPATIBLE and source[12:] not in _OWN_IPV6_LOW):
        # The mapped form is how a dual-stack socket names an IPv4 peer, never a source on the
        # wire (RFC 4291 2.5.5), and Linux's TCP refuses such a SYN. Taken for the IPv4 host, it
        # let a forger on an IPv6 link ban any IPv4 host, past the reverse-path filter that stops
        # the same source forged in IPv4.
        drops.add(DropReason.SOURCE_IPV4_IN_IPV6)
        return None
    if payload_length:
        claimed = IPv6Header.SIZE + payload_length
    elif next_header == IPPROTO_HOPOPTS:
        # A jumbogram (RFC 2675) states its length in a hop-by-hop option; the capture's own
        # length is all we need.
        claimed = len(data)
    else:
        drops.add(DropReason.BAD_LENGTH)
        return None
    end = min(claimed, len(data))
    offset = IPv6Header.SIZE
    walked = 0
    limit = IPV6_EXTENSION_LIMIT + (next_header == IPPROTO_HOPOPTS)
    while next_header != IPPROTO_TCP and next_header != IPPROTO_UDP:
        # Before the fragment branch: a fragment header is a header walked like any other, and
        # skipping the check there let a chain of them carry the count past the limit.
        if walked >= limit and (
                next_header == IPPROTO_FRAGMENT or next_header in IPV6_EXTENSION_HEADERS):
            drops.add(DropReason.IPV6_EXT_LIMIT)
            return None
        if next_header == IPPROTO_FRAGMENT:
            # A first fragment (offset 0) carries the transport header and the kernel answers it
            # once reassembled, so it is a probe like any other; later fragments are not.
            if end - offset < 8:
                drops.add(DropReason.TRUNCATED)
                return None
            following, _reserved, offset_flags = _FRAGMENT.unpack_from(data, offset)
            if offset_flags >> 3:
                drops.add(DropReason.FRAGMENT)
                return None
            offset += 8
            next_header = following
            walked += 1
            continue
        if next_header not in IPV6_EXTENSION_HEADERS:
            drops.add(DropReason.NOT_TCP_UDP)
            return None
        if next_header == IPPROTO_HOPOPTS and walked:
            # RFC 8200 allows it only first; the kernel discards the packet otherwise.
            drops.add(DropReason.IPV6_EXT_ORDER)
            return None
        if end - offset < 8:
            drops.add(DropReason.TRUNCATED)
            return None
        following, length = IPv6ExtensionHeader.LAYOUT.unpack_from(data, offset)
        offset += (length + 2) * 4 if next_header == IPPROTO_AH else (length + 1) * 8
        next_header = following
        walked += 1
    transport = _parse_transport(data, offset, end, claimed, next_header, drops)
    if transport is None:
        return None
    proto, source_port, destination_port, flags = transport
    return Packet(
        canonical(IPv6Address(source)),
        canonical(IPv6Address(destination)),
        proto,
        source_port,
        destination_port,
        flags,
        False,
    )


def _parse_transport(
    data: bytes, offset: int, end: int, claimed_end: int, protocol: int, drops: DropCounter
) -> tuple[Protocol, int, int, TcpFlag] | None:
    """Ports and flags of the TCP/UDP header at `offset`; bytes past `end` are not the packet's.

    `claimed_end` is where the IP header says the packet ends, which may lie beyond a short
    capture; the TCP header must fit inside it.
    """
    if protocol == IPPROTO_TCP:
        if end - offset < TcpHeader.SIZE:
            drops.add(DropReason.TRUNCATED)
            return None
        source_port, destination_port, _, _, data_offset, flags, _, _, _ = TcpHeader.LAYOUT.unpack_from(
            data, offset
        )
        tcp_header_length = (data_offset >> 4) * 4
        if tcp_header_length < TcpHeader.SIZE or offset + tcp_header_length > claimed_end:
            drops.add(DropReason.BAD_TCP_OFFSET)
            return None
        return Protocol.TCP, source_port, destination_port, _FLAG_VALUES[flags]
    if protocol == IPPROTO_UDP:
        if end - offset < UdpHeader.SIZE:
            drops.add(DropReason.TRUNCATED)
            return None
        source_port, destination_port, _, _ = UdpHeader.LAYOUT.unpack_from(data, offset)
        return Protocol.UDP, source_port, destination_port, _NO_FLAGS
    drops.add(DropReason.NOT_TCP_UDP)
    return None


_SCAN_FLAGS = TcpFlag.SYN | TcpFlag.FIN | TcpFlag.PSH | TcpFlag.URG
_XMAS = TcpFlag.FIN | TcpFlag.URG | TcpFlag.PSH


def _classify(flags: TcpFlag) -> str | None:
    if flags & (TcpFlag.ACK | TcpFlag.RST):
        return None
    scan = flags & _SCAN_FLAGS
    if not scan:
        # 1.2 writes " TCP NULL scan" with a stray leading space; the constant has none.
        return KIND_NULL
    if scan & _XMAS == _XMAS:
        return KIND_XMAS
    if scan == TcpFlag.FIN:
        return KIND_FIN
    if scan == TcpFlag.SYN:
        return KIND_SYN

    def bit(flag: TcpFlag) -> int:
        return 1 if flags & flag else 0

    return (
        f"Unknown Type: TCP Packet Flags: SYN: {bit(TcpFlag.SYN)} FIN: {bit(TcpFlag.FIN)} "
        f"ACK: {bit(TcpFlag.ACK)} PSH: {bit(TcpFlag.PSH)} URG: {bit(TcpFlag.URG)} "
        f"RST: {bit(TcpFlag.RST)}"
    )


# Every flag byte classified once: IntFlag arithmetic runs in Python, several microseconds a
# packet on the probe path, where an index costs next to nothing.
_KINDS = tuple(_classify(value) for value in _FLAG_VALUES)


def classify_tcp(flags: int) -> str | None:
    """1.2's ReportPacketType text for a TCP flag set, or None when ACK or RST marks it as part
    of a connection rather than a probe. ECE and CWR are ignored, as in 1.2."""
    return _KINDS[flags]
