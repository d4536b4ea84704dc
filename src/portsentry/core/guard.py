"""Spoofing guards: who must never be blocked, and how fast anyone may be.

A stealth hit is one unauthenticated packet, so an attacker can forge SYNs "from" the gateway or
the DNS resolver and make the host cut itself off (1.2 and 2.x have no defence). The guard refuses
to block protected addresses (own addresses and the ignore list are handled before it; here:
default gateways and DNS resolvers, kept current by the daemon), caps how many new bans start per
minute overall and per /24 (IPv4) or /64 (IPv6), and, for networks the admin marks as sensitive,
asks for TCP evidence (a completed connect-mode handshake) before a stealth-only hit may block.

Every table here is bounded; see `EvidenceTable` and `RefusalLog` for what is evicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network

from portsentry.core.addresses import canonical, impossible_source
from portsentry.core.probe import IPAddress, Probe

IPNetwork = IPv4Network | IPv6Network
MINUTE = 60.0


@dataclass(frozen=True)
class GuardSettings:
    ban_rate_limit: int = 60  # new bans per minute, 0 = no cap
    ban_rate_limit_net: int = 0  # new bans per minute per /24 or /64, 0 = no cap
    sensitive_networks: tuple[IPNetwork, ...] = ()
    refusal_window: float = 3600.0  # each refusal is logged once per host per window
    capacity: int = 65536  # entries per table


def net_of(address: IPAddress) -> IPNetwork:
    return ip_network(f"{address}/{24 if address.version == 4 else 64}", strict=False)


class BoundedSet:
    """Insertion-ordered set with a capacity; the oldest entry goes first (LRU on touch)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[IPAddress, float] = OrderedDict()

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def touch(self, item: IPAddress, now: float) -> None:
        self._items[item] = now
        self._items.move_to_end(item)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __iter__(self) -> Iterator[IPAddress]:
        return iter(self._items)

    def discard(self, item: IPAddress) -> None:
        self._items.pop(item, None)

    def age(self, item: IPAddress, now: float) -> float | None:
        seen = self._items.get(item)
        return None if seen is None else now - seen


@dataclass
class BanGuard:
    settings: GuardSettings = field(default_factory=GuardSettings)
    protected: frozenset[IPAddress] = frozenset()
    refused_total: int = 0
    rate_limited_total: int = 0

    def __post_init__(self) -> None:
        self.set_protected(self.protected)
        capacity = self.settings.capacity
        # Sources that completed a TCP handshake with a connect-mode port (LRU: a spoofer cannot
        # complete handshakes, so it cannot push real evidence out faster than real clients add it).
        self.evidence = BoundedSet(capacity)
        self._refusals_logged = BoundedSet(capacity)
        self._recent_bans: deque[float] = deque()
        self._recent_by_net: OrderedDict[IPNetwork, deque[float]] = OrderedDict()
        self._rate_window_logged = -1.0
        self.rate_limited_in_window = 0
        # While the fast lane may ban, it holds a share of the cap this window has not counted
        # (its bans not yet taken in); a ban started here must take its slot from that share at
        # once, or both paths spend one free slot. The service sets it; the engine does no I/O.
        self.claim: Callable[[float], bool] | None = None

    def set_protected(self, addresses: Iterable[IPAddress]) -> None:
        # Sources reach refusal() canonical; a resolver written `::ffff:a.b.c.d` must match them.
        self.protected = frozenset(map(canonical, addresses))

    def note(self, probe: Probe, now: float) -> None:
        """Every hit passes here; connect-mode TCP hits are proof of a real peer."""
        if probe.mode.is_classic and probe.mode.protocol.value == "TCP":
            self.evidence.touch(probe.source, now)

    def refusal(self, probe: Probe, now: float) -> str | None:
        """Why this hit must not block its source, or None when it may."""
        # Sensors drop these already; the guard holds for every other way in (admin, fleet).
        if (bad := impossible_source(probe.source)) is not None:
            return f"it cannot be the source of a real packet ({bad} address)"
        if probe.source in self.protected:
            return "it is a default gateway or DNS resolver of this host (spoofing guard)"
        if (not probe.mode.is_classic and self.settings.sensitive_networks
                and probe.source not in self.evidence
                and any(probe.source in net for net in self.settings.sensitive_networks
                        if net.version == probe.source.version)):
            return "stealth-only hit from a sensitive network without a completed TCP connection"
        return None

    def should_log_refusal(self, source: IPAddress, now: float) -> bool:
        age = self._refusals_logged.age(source, now)
        if age is not None and age < self.settings.refusal_window:
            return False
        self._refusals_logged.touch(source, now)
        return True

    def rate_limited(self, source: IPAddress, now: float) -> bool:
        """True when starting a ban now would exceed a cap; otherwise counts the ban."""
        limit, per_net = self.settings.ban_rate_limit, self.settings.ban_rate_limit_net
        self._forget_bans_before(now - MINUTE)
        if limit and len(self._recent_bans) >= limit:
            return True
        window: deque[float] | None = None
        if per_net:
            net = net_of(source)
            window = self._recent_by_net.pop(net, deque())
            while window and window[0] <= now - MINUTE:
                window.popleft()
            self._recent_by_net[net] = window
            while len(self._recent_by_net) > self.settings.capacity:
                self._recent_by_net.popitem(last=False)
            if len(window) >= per_net:
                return True
        if limit and self.claim is not None and not self.claim(now):
            return True
        self._recent_bans.append(now)
        if window is not None:
            window.append(now)
        return False

    def free_bans(self, now: float) -> int | None:
        """How many new bans the overall cap lets start now (None: no cap). The fast lane takes
        its allowance from this; with a per-network cap it is not used."""
        limit = self.settings.ban_rate_limit
        if not limit:
            return None
        self._forget_bans_before(now - MINUTE)
        return max(0, limit - len(self._recent_bans))

    def _forget_bans_before(self, start: float) -> None:
        while self._recent_bans and self._recent_bans[0] <= start:
            self._recent_bans.popleft()

    def count_ban(self, now: float) -> None:
        """A ban the fast lane already made within its allowance: counted, never refused."""
        self._recent_bans.append(now)

    def count_rate_limited(self, now: float) -> bool:
        """Count a hit refused by the rate cap; True for the first one of a minute (log it)."""
        self.rate_limited_total += 1
        self.rate_limited_in_window += 1
        if self._rate_window_logged < 0:
            self._rate_window_logged = now
            return True
        return False

    def rate_summary(self, now: float) -> int:
        """Hits refused by the rate cap in the minute that just ended (0: nothing to report)."""
        if self._rate_window_logged < 0 or now - self._rate_window_logged < MINUTE:
            return 0
        count, self.rate_limited_in_window, self._rate_window_logged = self.rate_limited_in_window, 0, -1.0
        return count

    def sizes(self) -> dict[str, int]:
        return {"evidence": len(self.evidence), "refusals_logged": len(self._refusals_logged),
                "rate_nets": len(self._recent_by_net)}
