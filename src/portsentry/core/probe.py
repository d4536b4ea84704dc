"""What a sensor saw: one Probe per connection, datagram or captured packet, handed to the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

IPAddress = IPv4Address | IPv6Address


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"


class Mode(enum.StrEnum):
    """The six 1.2 modes; the value is the flag without its dash, as $MODE$ and file suffixes use it."""

    TCP = "tcp"
    UDP = "udp"
    STCP = "stcp"
    SUDP = "sudp"
    ATCP = "atcp"
    AUDP = "audp"

    @property
    def protocol(self) -> Protocol:
        return Protocol.TCP if self in (Mode.TCP, Mode.STCP, Mode.ATCP) else Protocol.UDP

    @property
    def is_classic(self) -> bool:
        """Connect modes bind real sockets; 1.2 words some of their messages differently."""
        return self is Mode.TCP or self is Mode.UDP  # identity: `in` compares as strings

    @property
    def is_advanced(self) -> bool:
        return self in (Mode.ATCP, Mode.AUDP)


# Classification texts exactly as 1.2 writes them after "attackalert: ".
KIND_CONNECT = "Connect"
KIND_SYN = "TCP SYN/Normal scan"
KIND_FIN = "TCP FIN scan"
KIND_XMAS = "TCP XMAS scan"
KIND_NULL = "TCP NULL scan"
KIND_UDP = "UDP scan"


@dataclass(frozen=True, slots=True)
class Probe:
    """One hit on a watched port.

    `kind` is the classification text (one of the KIND_* constants, or 1.2's
    "Unknown Type: TCP Packet Flags: ..." text for odd flag combinations).
    `source_name` is the reverse-DNS name when RESOLVE_HOST is on, else the address text.
    """

    source: IPAddress
    port: int
    mode: Mode
    kind: str
    destination: IPAddress | None = None
    ip_options: bool = False
    source_name: str | None = None

    @property
    def name(self) -> str:
        return self.source_name if self.source_name else str(self.source)
