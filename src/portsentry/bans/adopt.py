"""Fleet peers' bans made here: the lifecycle's part for decisions that come from other hosts.

The fleet reader (fleet.node) hands over decisions that passed the signature check and this
host's guards, a batch at a time: a burst of 1,000 bans, or 100,000 when a host joins, must be one
store transaction and one kernel batch, as `block --file` is (bans.bulk). A fleet ban goes to the
native backend and to hosts.deny (KILL_HOSTS_DENY); KILL_ROUTE and KILL_RUN_CMD are not run for
it: a shell per remote decision would let one burst fork thousands of processes on every host.

Idempotent: a ban already held at least as long is left as it is (the longer ban holds, whoever
made it), so applying a decision twice, or hearing it again after a restart, changes nothing.
The expiry is the originating ban's, not this host's BLOCK_TIME.

Applied, then recorded: unlike a ban made here, a fleet ban is already on record, in Redis, and
the host is protected sooner when its kernel takes it before its store (a joining host, its
100,000 bans seconds sooner). A crash in between loses nothing: the fleet cursor is saved only
after both, so the next start reads those decisions again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from portsentry.bans.lifecycle import BanManager
from portsentry.bans.store import Ban, BanRequest
from portsentry.core import messages
from portsentry.core.probe import IPAddress, Mode
from portsentry.responders.backend import BackendError
from portsentry.responders.hostsdeny import HostsDenyError
from portsentry.responders.substitute import hosts_deny_entry

FLEET_MODE = str(Mode.TCP)
# From this many new fleet bans in one batch on, the kernel takes them as restore_many does.
RESTORE_FROM = 1000  # stored like a manual block: no port, no mode of its own


@dataclass(frozen=True, slots=True)
class RemoteBan:
    address: IPAddress
    expires: float | None  # the origin's expiry; None: forever
    origin: str  # the peer's host id
    reason: str


def longer(expires: float | None, than: float | None) -> bool:
    """Whether a ban until `expires` outlasts one until `than` (None: forever)."""
    if than is None:
        return False
    return expires is None or expires > than


def adopt_bans(bans: BanManager, wanted: Sequence[RemoteBan], now: float,
               hosts_deny: str | None = None, kernel_first: bool = False) -> list[Ban]:
    """Make or lengthen the bans in `wanted` that this host does not already hold as long; the
    bans made. `hosts_deny` is KILL_HOSTS_DENY (None: no line). With `kernel_first`, `wanted`
    has one ban per address (the fleet's active set) and is taken as it is."""
    if kernel_first:
        fresh = [want for want in wanted if want.expires is None or want.expires > now]
    else:
        latest: dict[IPAddress, RemoteBan] = {}
        for want in wanted:
            known = latest.get(want.address)
            running = want.expires is None or want.expires > now
            if running and (known is None or longer(want.expires, known.expires)):
                latest[want.address] = want
        fresh = list(latest.values())
    if not fresh:
        return []
    with bans.exclusive():
        made, lines_held = _apply(bans, fresh, now, hosts_deny)
    # Named as a local ban's event names what holds it (BanManager.enforce): the native set, else
    # hosts.deny; "none" when nothing here does (no BAN_BACKEND, no KILL_HOSTS_DENY).
    native = bans.backend.name if bans.backend is not None else None
    for ban in made:
        backend = native or ("hosts_deny" if ban.hosts_deny_line and lines_held else "none")
        bans.telemetry.ban(ban.address, backend, None if ban.expires is None else ban.expires - now,
                           "fleet", now, count=max(ban.offences - 1, 0))
    return made


def _apply(bans: BanManager, fresh: list[RemoteBan], now: float,
           hosts_deny: str | None) -> tuple[list[Ban], bool]:
    """Kernel first (when there is one), then the store, then hosts.deny; the bans made, and
    whether hosts.deny took their lines."""
    if bans.backend is not None:
        _kernel_first(bans, fresh, now)
    backends = (bans.backend.name,) if bans.backend is not None else ()
    by_origin: dict[str, list[BanRequest]] = {}
    for remote in fresh:
        line = hosts_deny_entry(hosts_deny, remote.address, 0, Mode.TCP) if hosts_deny else None
        by_origin.setdefault(remote.origin, []).append(BanRequest(
            remote.address, remote.reason, FLEET_MODE, 0,
            None if remote.expires is None else remote.expires - now, line, backends))
    # Recorded before applied, as every ban: a crash half-way leaves records restore completes.
    made: list[Ban] = []
    for origin, requests in by_origin.items():
        made += bans.store.ban_absent(requests, now, origin, keep_longer=True)

    lines = {ban.hosts_deny_line: ban.address for ban in made if ban.hosts_deny_line}
    if lines:
        def own(appended: list[str]) -> None:
            bans.store.own_lines(((lines[line], line) for line in appended), now)

        try:
            bans.hosts_deny.add_many(list(lines), on_append=own)
        except (HostsDenyError, OSError, ValueError) as error:
            bans.log(messages.config_error(f"cannot add {len(lines)} lines to {bans.hosts_deny.path}: "
                                           f"{error}"))
            return made, False
    return made, True


def _kernel_first(bans: BanManager, fresh: list[RemoteBan], now: float) -> None:
    """The active set into the kernel before the store; an address the store holds at least as
    long is left out (and `ban_absent` leaves it out of the store too)."""
    # A joining host's store is usually empty: then 100,000 look-ups find nothing.
    skip = len(fresh) > 1000 and not bans.store.active_count(now)
    held = {} if skip else {ban.address: ban for ban in bans.store.get_many(want.address for want in fresh)}
    new = [want for want in fresh if want.address not in held]
    longer_here = [want for want in fresh if (old := held.get(want.address)) is not None
                   and (not old.active(now) or longer(want.expires, old.expires))]
    assert bans.backend is not None
    if len(new) < RESTORE_FROM:
        _kernel(bans, [(want.address, want.expires) for want in new + longer_here], now)
        return
    try:
        # Addresses the store does not hold are not in the set either: one plain add each (a
        # third of add_many's messages, which reset a timeout already there), sent by a thread
        # of its own while the next batch is encoded: worth it for thousands, not for a few.
        bans.backend.restore_many((want.address.packed, None if want.expires is None
                                   else max(want.expires - now, 1.0)) for want in new)
    except (BackendError, OSError) as error:
        bans.log(messages.native_block_failed(f"({len(new)} fleet bans)", bans.backend.describe(),
                                              str(error)))
    _kernel(bans, [(want.address, want.expires) for want in longer_here], now)


def _kernel(bans: BanManager, wanted: list[tuple[IPAddress, float | None]], now: float) -> None:
    if bans.backend is None or not wanted:
        return
    try:
        bans.backend.add_many((address, None if expires is None else max(expires - now, 1.0))
                              for address, expires in wanted)
    except (BackendError, OSError) as error:
        bans.log(messages.native_block_failed(f"({len(wanted)} fleet bans)", bans.backend.describe(),
                                              str(error)))


def lift_remote(bans: BanManager, address: IPAddress, origin: str, now: float) -> bool:
    """A peer lifted its ban (unblock, fleet-wide): lift it here too, recorded as the peer's, so
    this host does not publish it again. False when nothing was banned."""
    return bans.lift(address, now, f"unblocked on {origin} (fleet)", origin=origin)
