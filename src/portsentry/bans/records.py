"""What the ban store holds and hands out: bans, history events, the change feed's entries, bulk
requests, and the pure rules around them (an address as stored, how long a repeat offender's ban
lasts). No SQLite here: bans.store reads and writes these.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Literal

from portsentry.core.addresses import canonical
from portsentry.core.probe import IPAddress, Probe

EventKind = Literal["ban", "extend", "lift", "expire"]
EVENT_KINDS: tuple[EventKind, ...] = ("ban", "extend", "lift", "expire")

# Where a change came from: a ban made here by detection or by an admin; a fleet peer's host id
# later. Applying a change whose origin is this host again is harmless (bans are idempotent).
ORIGIN_LOCAL = "local"
# An admin's `unblock --local`: lifted on this host only, so the fleet is not told.
ORIGIN_LOCAL_ONLY = "local-only"

# In a ban's `backends`: KILL_ROUTE ran for it on this host. Only such a ban gets KILL_ROUTE again
# after a reboot and KILL_ROUTE_UNDO at its lift; a fleet peer's ban, a ban whose KILL_ROUTE failed
# and a ban made while KILL_ROUTE was unset never ran it, and their lift must not run an
# undo that takes out a route somebody else made. Not a backend name, so never mistaken for one.
ROUTE_MARK = "KILL_ROUTE"

# The reason of a ban an admin made (`portsentry block`, `block --file`).
MANUAL_REASON = "manual block"
# The reason of the lift that drops the record of a block whose every step failed.
BLOCK_FAILED = "block failed"


def ban_reason(probe: Probe) -> str:
    """Why a ban was made, as the event log says it: a block by hand, or the scan of a port
    ("scan: 31337/tcp")."""
    if probe.kind == MANUAL_REASON:
        return MANUAL_REASON
    return f"scan: {probe.port}/{probe.mode.protocol.value.lower()}"

# History and offender records are kept this long and no more than this many (HISTORY_RETENTION
# and HISTORY_MAX_ROWS in the configuration, 0 = no limit; the README's "Bans" section). A year of
# a busy host's bans fits; a feed consumer that falls behind what is kept re-reads the active set.
DEFAULT_RETENTION = 90 * 86400.0
DEFAULT_MAX_ROWS = 1_000_000

class StoreError(Exception):
    """The ban store cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class Ban:
    address: IPAddress
    reason: str
    mode: str
    port: int
    first_seen: float
    last_seen: float
    count: int
    expires: float | None  # None = forever
    offences: int  # bans of this address so far, this one included
    hosts_deny_line: str | None  # the exact line written, so lifting removes exactly that line
    backends: tuple[str, ...]  # native backends holding the ban ("nftables", ...), and ROUTE_MARK
    # Who set the current expiry: ORIGIN_LOCAL (detection or an admin here), or a fleet host id.
    origin: str = ORIGIN_LOCAL

    def active(self, now: float) -> bool:
        return self.expires is None or self.expires > now

    @property
    def routed(self) -> bool:
        """KILL_ROUTE ran for this ban here (ROUTE_MARK)."""
        return ROUTE_MARK in self.backends


@dataclass(frozen=True)
class Event:
    at: float
    kind: EventKind
    address: IPAddress
    detail: str


# A BanRequest duration: as long as BLOCK_TIME and escalation say for this address's offences.
POLICY = "policy"


@dataclass(frozen=True)
class BanRequest:
    """What `ban_many` bans: one address and how."""

    address: IPAddress
    reason: str
    mode: str
    port: int
    duration: float | str | None  # seconds; None = forever; POLICY
    hosts_deny_line: str | None = None
    backends: tuple[str, ...] = ()


@dataclass(frozen=True)
class Change:
    """One entry of the change feed: a ban made, extended, lifted or expired.

    `id` grows monotonically; a consumer keeps the last id it has seen and asks for what came
    after. `expires` is the ban's expiry after a "ban" or "extend" (None: forever), and None for
    "lift" and "expire". `origin` says who made the change (ORIGIN_LOCAL, or a fleet host id).
    """

    id: int
    at: float
    kind: EventKind
    address: IPAddress
    expires: float | None
    origin: str
    detail: str

    @property
    def bans(self) -> bool:
        return self.kind in ("ban", "extend")


@dataclass(frozen=True)
class TimeChange:
    """A block by hand of an address already banned: no new ban, only its end may move. The
    later end holds, as when any two bans meet (a scan's, a peer's, an admin's); `unblock`
    first makes a shorter one. Ends are times, None for forever."""

    address: IPAddress
    old_end: float | None
    asked_end: float | None
    new_end: float | None

    @property
    def changed(self) -> bool:
        return self.new_end != self.old_end


def time_change(ban: Ban, duration: float | None, now: float) -> TimeChange:
    """What a block by hand for `duration` seconds (None: forever) at `now` does to `ban`, in force."""
    asked = None if duration is None else now + duration
    new_end = None if ban.expires is None or asked is None else max(ban.expires, asked)
    return TimeChange(ban.address, ban.expires, asked, new_end)


def holder_of(ban: Ban | None, native: str | None) -> str:
    """What holds a ban, named as the daemon's own ban events name it: the native backend, else
    hosts.deny, else KILL_ROUTE; for a ban already gone, the native backend if there is one."""
    if ban is None:
        return native or "none"
    held = [name for name in ban.backends if name != ROUTE_MARK]
    if held:
        return held[0]
    if ban.hosts_deny_line:
        return "hosts_deny"
    return "route" if ban.routed else "none"


def normalise(address: IPAddress | str) -> IPAddress:
    """The address as stored: parsed if text, IPv4 inside IPv6 turned into IPv4 (addresses.canonical),
    without an IPv6 zone id."""
    parsed = ip_address(address) if isinstance(address, str) else address
    if isinstance(parsed, IPv6Address) and parsed.scope_id is not None:
        # `fe80::1%eth0` names our interface, not the host (no packet carries a zone id, and
        # sensors.connect drops it too). Kept, it was stored as text inet_pton cannot read back,
        # and every later read of the bans raised.
        parsed = IPv6Address(int(parsed))
    return canonical(parsed)


# The longest ban that ends: a longer one is forever. Its end would otherwise lie past what the
# store's time functions take (localtime fails from about 3e16 s, as an OSError at the record)
# and far past any kernel timer; nobody means "in 300 years" other than as "forever".
LONGEST_BAN = 100 * 365 * 86400.0


def ban_duration(base: float, factor: float, cap: float, offences: int) -> float | None:
    """Seconds the next ban lasts after `offences` earlier ones; None = forever.

    base 0 bans forever; otherwise base * factor**offences, at most `cap` (cap 0 = no cap).
    """
    if base < 0 or factor < 0 or cap < 0 or offences < 0:
        raise ValueError(
            f"ban duration: base {base:g}, factor {factor:g}, cap {cap:g} and offences {offences} "
            "must not be negative"
        )
    if base == 0:
        return None
    try:
        duration = float(base) * float(factor) ** offences
    except OverflowError:
        duration = float("inf")
    if cap and duration > cap:
        return cap
    if duration > LONGEST_BAN:
        # Uncapped growth (BLOCK_TIME_MAX 0) past a century, or past what a float holds.
        return None
    return duration


def stored_address(text: str) -> IPAddress:
    """An address as the store writes it (canonical text), parsed about five times faster than
    ip_address(), which first tries IPv4 and raises for every IPv6 address: at a million bans
    that was most of the start-up."""
    if ":" in text:
        return IPv6Address(int.from_bytes(socket.inet_pton(socket.AF_INET6, text)))
    return IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text)))
