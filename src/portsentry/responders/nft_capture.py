"""The stealth sensor's capture rules in our nftables table: what they log to NFLOG (the nft twin
of sensors.bpf's filter), and the first-probe ban in the kernel. The ban-set backend
(responders.nftables) installs and repairs them (nft_capture_state, with nft_commands' scripts).

First-probe ban (issue 11): a qualifying probe, that is a TCP packet without ACK/RST or a UDP
datagram outside a tracked flow, to a port in kports_tcp/kports_udp (watched, not excluded, no
live service: kept current by the daemon) for which the kernel finds no socket (a service started
since the daemon's last refresh of kports), from a source in neither protect4/6 (own addresses,
the ignore list: not even copied to the daemon) nor nokernel4/6 (sources the kernel must never
ban on its own: gateways, resolvers, impossible ones, SENSITIVE_NETWORKS, which the daemon still
decides, so a forged probe from the gateway is refused and said so), under BAN_RATE_LIMIT (one
cap for all four ban rules: a free slot in ban_slots), is added to blocked4/6 with the ban's
timeout and dropped by the rule itself; so the scanner's second packet, microseconds later,
meets the drop. The rule also notes (source, protocol, port) in caught4/6 and logs the packet to
NFLOG: the daemon writes 1.2's lines and records the ban, and its maintenance thread settles
every caught entry (adopted, lifted, or recorded late when the NFLOG copy was lost).

Probes the daemon never sees because their source is banned already (the base chain drops them
before the capture chain logs them) are counted per source in dropped4/6, by `count_rules` in a
chain that runs just before that drop: the daemon reads the counters and writes one summary line
per source, so every watched-port probe is logged or counted, as 1.2 logged each one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from portsentry.core.probe import Protocol

PROTECT4, PROTECT6 = "protect4", "protect6"
NOKERNEL4, NOKERNEL6 = "nokernel4", "nokernel6"
CAUGHT4, CAUGHT6 = "caught4", "caught6"
DROPPED4, DROPPED6 = "dropped4", "dropped6"
DROPPED_TIMEOUT = 3600  # seconds a source's count is kept after its last dropped probe
KPORTS = {Protocol.TCP: "kports_tcp", Protocol.UDP: "kports_udp"}
# BAN_RATE_LIMIT is one cap on new bans overall, at most N in any 60 s as the daemon's guard
# counts them: a set of N slots that every ban rule (TCP and UDP, IPv4 and IPv6) fills, and the
# daemon's own bans too (connect modes, probes left to the daemon), each slot expiring 60 s after
# its ban. A full set fails the rule's `add`, which ends the rule before its
# ban, so the probe goes on to the log rule and the daemon decides. A token bucket (a named
# `limit`, rate N/minute burst N) let up to 2N in within a minute: the burst, then its refill.
BAN_SLOTS = "ban_slots"
BAN_SLOTS_WINDOW = 60  # seconds a slot stays taken
# The slot is a number from the rule's own counter (`numgen inc`), each rule in its own quarter
# of the 32-bit range: two rules' counters never meet, and a number comes round again only after
# 2**28 bans of one rule, long after its slot expired.
SLOT_SPAN = 1 << 28
# The daemon's own bans take their slots above the four rules' ranges (NftablesBackend.claim_ban_slot).
DAEMON_SLOTS = 3 << 30
# Before ban_slots, the cap was this named limit; a table made then still holds it.
OLD_BAN_LIMIT = "ban_rate"


@dataclass(frozen=True, slots=True)
class KernelBan:
    """The first-probe ban: for which protocols, for how long, at most how many a minute."""

    protocols: frozenset[Protocol]
    timeout: int | None  # seconds (BLOCK_TIME); None: forever
    rate: int = 0  # bans a minute (BAN_RATE_LIMIT); 0: no cap

    def __post_init__(self) -> None:
        if self.timeout is not None and not 0 < self.timeout <= 10 * 365 * 86400:
            raise ValueError(f"kernel ban timeout {self.timeout!r} is not 1 s to ten years")
        if not 0 <= self.rate <= 1_000_000:
            raise ValueError(f"kernel ban rate {self.rate!r} is not 0 to 1000000 a minute")

    def slots(self) -> str | None:
        """The BAN_SLOTS set's body, shared by the ban rules; None without a cap."""
        return self.slots_of(self.rate) if self.rate else None

    @staticmethod
    def slots_of(size: int) -> str:
        return f"type mark; size {size}; timeout {BAN_SLOTS_WINDOW}s; flags dynamic,timeout;"

    def rules(self, group: int) -> list[str]:
        """The ban rules, one per family and protocol; they go after the protect rules and
        need the BAN_SLOTS set when there is a cap (NftablesBackend.capture_script)."""
        timeout = "" if self.timeout is None else f" timeout {self.timeout}s"
        found: list[str] = []
        families = (("ip saddr", "blocked4", NOKERNEL4, CAUGHT4),
                    ("ip6 saddr", "blocked6", NOKERNEL6, CAUGHT6))
        for saddr, blocked, nokernel, caught in families:
            for protocol in (Protocol.TCP, Protocol.UDP):
                if protocol not in self.protocols:
                    continue
                if protocol is Protocol.TCP:
                    match = f"tcp flags & (ack | rst) == 0 tcp dport @{KPORTS[protocol]}"
                    port = "tcp dport"
                else:
                    match = f"udp dport @{KPORTS[protocol]} ct state != {{ established, related }}"
                    port = "udp dport"
                slot = (f" add @{BAN_SLOTS} {{ numgen inc mod {SLOT_SPAN} offset "
                        f"{len(found) * SLOT_SPAN} }}" if self.rate else "")
                found.append(
                    f"meta pkttype host {saddr} != @{nokernel} {match}{slot} "
                    f"add @{blocked} {{ {saddr}{timeout} }} "
                    f"add @{caught} {{ {saddr} . meta l4proto . {port}{timeout} }} "
                    f"log group {group} drop"
                )
        return found


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What the capture rules log: TCP without ACK/RST and UDP, of `protocols`, addressed to this
    host's link address, to destination ports below `max_port` (None: any port)."""

    group: int
    max_port: int | None
    protocols: frozenset[Protocol]
    quiet_udp_ports: frozenset[int] = frozenset()
    kernel: KernelBan | None = None

    @classmethod
    def of(cls, group: int, max_port: int | None, protocols: Collection[Protocol],
           quiet_udp_ports: Collection[int] = (), kernel: KernelBan | None = None) -> CaptureSpec:
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
        return cls(group, None if max_port == 0x10000 else max_port, wanted, quiet, kernel)

    def count_rules(self) -> list[str]:
        """Count, per banned source, the probes the capture would have logged (or, with the
        first-probe ban, the probes it would have banned for): the drop chain discards them
        before the capture chain sees them. They change nothing for the packet."""
        if self.max_port == 0:
            return []
        bound = "" if self.max_port is None else f" tcp dport < {self.max_port}"
        matches = {}
        if self.kernel is not None:
            matches[Protocol.TCP] = f"tcp flags & (ack | rst) == 0 tcp dport @{KPORTS[Protocol.TCP]}"
            matches[Protocol.UDP] = (f"udp dport @{KPORTS[Protocol.UDP]} "
                                     "ct state != { established, related }")
        else:
            matches[Protocol.TCP] = f"tcp flags & (ack | rst) == 0{bound}"
            udp = "meta l4proto udp" if self.max_port is None else f"udp dport < {self.max_port}"
            matches[Protocol.UDP] = f"{udp} ct state != {{ established, related }}"
        found = []
        families = (("ip saddr", "blocked4", DROPPED4), ("ip6 saddr", "blocked6", DROPPED6))
        for saddr, blocked, dropped in families:
            for protocol in (Protocol.TCP, Protocol.UDP):
                if protocol in self.protocols:
                    # The probe test first: established traffic (ACK set) is then passed over
                    # without a second lookup in the ban set, which the filter chain makes anyway.
                    found.append(f"meta pkttype host {matches[protocol]} {saddr} @{blocked} "
                                 f"update @{dropped} {{ {saddr} counter }}")
        return found

    def rules(self) -> list[str]:
        """The rule bodies, in order; none when no port can match (max_port 0)."""
        if self.max_port == 0:
            return []
        log = f"log group {self.group}"
        found = []
        if self.kernel is not None:
            # Protected and ignored sources are neither banned nor copied to the daemon.
            found += [f"ip saddr @{PROTECT4} counter return", f"ip6 saddr @{PROTECT6} counter return"]
            # A packet some socket here takes (a service listening, even one started a moment
            # ago, before the daemon's next refresh of kports) is no probe: the kernel's own
            # socket lookup says so, where kports alone left a window of up to a second in which
            # a new service's first client was banned. Found sockets are transparent or not.
            found += [f"meta l4proto {{ tcp, udp }} socket transparent {flag} counter return"
                      for flag in (0, 1)]
            found += self.kernel.rules(self.group)
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
