"""This host's say over a fleet decision: whether a verified decision of a peer may be applied
here. Pure: the clock and the guarded addresses are passed in.

A ban is refused for this host's own addresses, its ignore list, its default gateways and DNS
resolvers (the same guards as a local ban), for sources no real packet can have, and for
link-local addresses (a host of the peer's link, not of this one); a decision from a host
outside FLEET_ACCEPT_HOSTS (or new past MAX_PEERS hosts), or older than one already taken from
that host (a replay), is refused whatever it says; our own decisions coming back are echoes,
not refusals.
Fleet bans have their own rate cap (FLEET_BAN_RATE_LIMIT a minute). The reasons are the label
values of the refused-decisions metric.

Owned by the fleet reader thread; `set_guards` is called from the daemon's main loop with
immutable values, so a plain attribute swap is enough.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container
from dataclasses import dataclass, field

from portsentry.core.addresses import canonical, impossible_source
from portsentry.core.probe import IPAddress
from portsentry.fleet.decision import Decision
from portsentry.fleet.settings import RESERVED_IDS

MINUTE = 60.0
# Hosts whose newest (epoch, seq) is remembered (in memory and fleet.json). A decision from a host
# id past them is not accepted: a key holder making up host ids would otherwise make every host
# keep one entry per id for good.
MAX_PEERS = 10_000
ECHO = "echo"  # our own decision read back: skipped, never counted as refused
REASONS = ("unsigned", "bad_signature", "malformed", "host_not_accepted", "replay", "impossible",
           "own_address", "ignored", "protected", "link_local", "expired", "rate_limited", "stale")


@dataclass(frozen=True)
class Guards:
    """What this host never bans, as of the last refresh."""

    own: frozenset[IPAddress] = frozenset()
    ignore: Container[IPAddress] = frozenset()
    protected: frozenset[IPAddress] = frozenset()  # default gateways and DNS resolvers
    broadcasts: frozenset[IPAddress] = frozenset()

    def __post_init__(self) -> None:
        # As integers: hashing an address object costs a hex() each time, and a joining host
        # checks 100,000 of them against these.
        object.__setattr__(self, "own_keys", frozenset(map(_key, self.own)))
        object.__setattr__(self, "protected_keys", frozenset(map(_key, self.protected)))
        object.__setattr__(self, "broadcast_keys", frozenset(map(_key, self.broadcasts)))

    def refusal(self, address: IPAddress) -> str | None:
        """Why this host must never ban `address` ("impossible", "own_address", "ignored",
        "protected"), or None. Also for bans made by hand (service.admin.Spared)."""
        key = _key(address)
        if impossible_source(address) is not None or key in self.broadcast_keys:  # type: ignore[attr-defined]
            return "impossible"
        if key in self.own_keys:  # type: ignore[attr-defined]
            return "own_address"
        if address in self.ignore:
            return "ignored"
        if key in self.protected_keys:  # type: ignore[attr-defined]
            return "protected"
        return None


def _key(address: IPAddress) -> int:
    """One integer per host, IPv4 and IPv6 apart. Canonical first: decisions name the IPv4 form,
    and a guard may hold the mapped one (`nameserver ::ffff:a.b.c.d` in resolv.conf)."""
    address = canonical(address)
    return int(address) if address.version == 4 else int(address) | 1 << 128


@dataclass
class Gate:
    host_id: str
    accept: frozenset[str] | None = None
    rate_limit: int = 0  # fleet bans a minute, 0 = no cap
    guards: Guards = field(default_factory=Guards)
    # host -> (epoch, seq) of the newest decision taken from it
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._recent: deque[float] = deque()

    def set_guards(self, guards: Guards) -> None:
        self.guards = guards

    def check(self, decision: Decision, now: float, live: bool = True, capped: bool = True) -> str | None:
        """None when `decision` may be applied; else ECHO or the refusal reason. A live decision
        (from the stream) that gets past the host checks moves that host's newest (epoch, seq),
        applied or not. The active set (`live` False) holds each address's latest ban whatever its
        age, so it is neither ordered nor rate-capped; stream entries read again after it was
        loaded (`capped` False) are that same past, ordered but not capped."""
        if decision.host == self.host_id:
            return ECHO
        # The store's names for this host's own bans: taken from a peer, its ban became ours and
        # was published again under our id.
        if decision.host in RESERVED_IDS or (self.accept is not None and decision.host not in self.accept):
            return "host_not_accepted"
        if live:
            if decision.host not in self.seen and len(self.seen) >= MAX_PEERS:
                return "host_not_accepted"
            order = (decision.epoch, decision.seq)
            # Equal is fine: a host republishes its active bans under its current seq.
            if order < self.seen.get(decision.host, (0, 0)):
                return "replay"
            self.seen[decision.host] = order
        if decision.kind == "lift":
            return None  # lifting never harms this host; guards protect against bans
        if (refused := self.guards.refusal(decision.address)) is not None:
            return refused
        # A link-local address names a host of the peer's link only; here it is whoever is on
        # this host's link, which no peer has seen. (A ban made by hand here may name one.)
        if canonical(decision.address).is_link_local:
            return "link_local"
        if decision.expires is not None and decision.expires <= now:
            return "expired"
        if live and capped and self.rate_limited(now):
            return "rate_limited"
        return None

    def rate_limited(self, now: float) -> bool:
        """True when one more fleet ban now would exceed the cap; otherwise counts it."""
        if not self.rate_limit:
            return False
        while self._recent and self._recent[0] <= now - MINUTE:
            self._recent.popleft()
        # Counted before the wall clock was set back: kept, they would never leave the minute
        # until the clock caught up with them, and the cap would refuse every fleet ban till then.
        while self._recent and self._recent[-1] > now:
            self._recent.pop()
        if len(self._recent) >= self.rate_limit:
            return True
        self._recent.append(now)
        return False
