"""One form per host, and the source addresses no real peer can have.

Every address that enters the daemon (a captured packet, an accepted connection, an admin's
`block`, later a fleet peer) passes `canonical` once, so the guard, the engine, the store, the
history and every backend see a single form: an IPv4 host that reaches us inside IPv6
(`::ffff:a.b.c.d` mapped, or the deprecated `::a.b.c.d` compatible form) is that IPv4 host. The
packet parser drops a captured IPv6 packet with such a source before it gets here: only a socket
names a peer so, no IPv4 host sends IPv6.
Without this, a forged IPv6 SYN from `::ffff:<gateway>` slipped past a guard that knew the
gateway only as IPv4, and the store, which unmaps, then banned the real gateway at the next start.

`impossible_source` names sources that are never valid on the wire. The kernel's routing drops
most of them as martians, but an AF_PACKET capture sees packets before routing, so a forged SYN
"from" 0.0.0.0, a multicast group or the broadcast address would otherwise become a ban.
Pure functions, no I/O: the host's own subnet broadcasts are passed in by the caller.
"""

from __future__ import annotations

import enum
from collections.abc import Container, Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

IPAddress = IPv4Address | IPv6Address

# What impossible_source refuses, as networks, for the kernel's first-probe ban, which must never
# ban these on its own: 0/8, loopback, multicast and 240/4 (with 255.255.255.255); ::, ::1 and
# the IPv4-compatible ::/96; IPv4-mapped ::ffff:0:0/96 (the daemon's parser drops them as forged);
# IPv6 multicast.
IMPOSSIBLE_NETWORKS: tuple[IPv4Network | IPv6Network, ...] = tuple(
    ip_network(text)
    for text in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/3", "::/96", "::ffff:0:0/96", "ff00::/8")
)



def possible_networks(networks: Iterable[IPv4Network | IPv6Network]) -> tuple[IPv4Network | IPv6Network, ...]:
    """Those of `networks` that share no address with IMPOSSIBLE_NETWORKS."""
    return tuple(n for n in networks
                 if not any(n.overlaps(bad) for bad in IMPOSSIBLE_NETWORKS if bad.version == n.version))


# Tested on the integer value: this runs once per captured packet, and `address in network`
# costs a microsecond where a shift costs tens of nanoseconds.
_IPV4_MAPPED_TAG = 0xFFFF  # ::ffff:0:0/96, RFC 4291 2.5.5.2
_LIMITED_BROADCAST = 0xFFFFFFFF


class BadSource(enum.StrEnum):
    """Why a source address cannot be a real peer; the value is the metric label."""

    UNSPECIFIED = "unspecified"
    LOOPBACK = "loopback"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    RESERVED = "reserved"


def canonical(address: IPAddress) -> IPAddress:
    """IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d, RFC 4291 2.5.5.1, deprecated)
    IPv6 addresses as IPv4; :: and ::1 are IPv6's own and stay; anything else unchanged."""
    if isinstance(address, IPv6Address):
        value = int(address)
        high = value >> 32
        if high == _IPV4_MAPPED_TAG or (high == 0 and value > 1):
            return IPv4Address(value & 0xFFFFFFFF)
    return address


def impossible_source(address: IPAddress, broadcasts: Container[IPAddress] = ()) -> BadSource | None:
    """Why `address` (already canonical) can never be the source of a real probe, or None.

    `broadcasts` are the host's own subnet broadcast addresses.
    """
    value = int(address)
    if isinstance(address, IPv4Address):
        first = value >> 24
        if first == 0:  # 0.0.0.0/8, RFC 1122 3.2.1.3: a source only while a host boots
            return BadSource.UNSPECIFIED
        if first == 127:
            return BadSource.LOOPBACK
        if 224 <= first < 240:
            return BadSource.MULTICAST
        if value == _LIMITED_BROADCAST or address in broadcasts:
            return BadSource.BROADCAST
        if first >= 240:  # 240.0.0.0/4, RFC 1112 "class E", never assigned
            return BadSource.RESERVED
        return None
    if value == 0:
        return BadSource.UNSPECIFIED
    if value == 1:
        return BadSource.LOOPBACK
    if value >> 120 == 0xFF:  # ff00::/8
        return BadSource.MULTICAST
    if address in broadcasts:
        return BadSource.BROADCAST
    return None
