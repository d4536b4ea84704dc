"""The stealth sensor's capture rules in our nftables table: what they log to NFLOG (the nft twin
of sensors.bpf's filter). The ban-set backend (responders.nftables) installs and repairs them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from portsentry.core.probe import Protocol


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What the capture rules log: TCP without ACK/RST and UDP, of `protocols`, addressed to this
    host's link address, to destination ports below `max_port` (None: any port)."""

    group: int
    max_port: int | None
    protocols: frozenset[Protocol]
    quiet_udp_ports: frozenset[int] = frozenset()

    @classmethod
    def of(cls, group: int, max_port: int | None, protocols: Collection[Protocol],
           quiet_udp_ports: Collection[int] = ()) -> CaptureSpec:
        if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group!r} is not between 0 and 65535")
        if max_port is not None and (isinstance(max_port, bool) or not isinstance(max_port, int)
                                     or not 0 <= max_port <= 0x10000):
            raise ValueError(f"max_port {max_port!r} is not between 0 and 65536")
        wanted = frozenset(protocols)
        if not wanted <= set(Protocol):
            raise ValueError(f"protocols {sorted(map(str, protocols))} are not TCP/UDP")
        # 65536 bounds nothing, and nft cannot spell it for a 16-bit port.
        quiet = frozenset(quiet_udp_ports)
        if any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 0x10000 for p in quiet):
            raise ValueError(f"quiet UDP ports {sorted(quiet)!r} are not all ports")
        return cls(group, None if max_port == 0x10000 else max_port, wanted, quiet)

    def rules(self) -> list[str]:
        """The rule bodies, in order; none when no port can match (max_port 0)."""
        if self.max_port == 0:
            return []
        log = f"log group {self.group}"
        found = []
        if Protocol.TCP in self.protocols:
            bound = "" if self.max_port is None else f" tcp dport < {self.max_port}"
            # `meta pkttype host`: the BPF filter's PACKET_HOST test (no broadcast/multicast).
            found.append(f"meta pkttype host tcp flags & (ack | rst) == 0{bound} {log}")
        if Protocol.UDP in self.protocols:
            match = "meta l4proto udp" if self.max_port is None else f"udp dport < {self.max_port}"
            # Replies to our own queries (DNS, NTP) belong to a tracked flow; probes do not.
            quiet = ""
            if self.quiet_udp_ports:
                # Services' own traffic (a busy syslog server) never reaches the daemon.
                quiet = f" udp dport != {{ {', '.join(map(str, sorted(self.quiet_udp_ports)))} }}"
            found.append(f"meta pkttype host {match}{quiet} ct state != {{ established, related }} {log}")
        return found
