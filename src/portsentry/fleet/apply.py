"""Peers' decisions made here: verified, checked by the Gate, and applied through the ban
lifecycle (bans.adopt). Owned by the fleet-read thread, which hands it what it read: the active
set when it loads it, stream entries as it follows them. No Redis here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from portsentry.bans.adopt import RemoteBan, adopt_bans, lift_remote
from portsentry.bans.lifecycle import BanManager
from portsentry.bans.store import ORIGIN_LOCAL
from portsentry.core.probe import IPAddress
from portsentry.fleet.decision import BadDecision, Decision, decode, reachable, unpack
from portsentry.fleet.gate import ECHO, Gate
from portsentry.fleet.settings import FleetSettings
from portsentry.fleet.tally import Tally

# How far apart two hosts' clocks may be for a lift to be taken as decided before a ban made
# here: NTP keeps hosts within milliseconds, an unsynchronised one drifts by seconds a day.
CLOCK_SKEW = 30.0

LIVE_LOG_LIMIT = 20  # a batch with more bans than this is logged as one summary line
SAME_EXPIRY = 1.0  # seconds

Entries = list[tuple[bytes, dict[bytes, bytes]]]


class Applier:
    def __init__(self, settings: FleetSettings, bans: BanManager, gate: Gate, tally: Tally,
                 clock: Callable[[], float], hosts_deny: str | None = None,
                 resend: Callable[[IPAddress], None] | None = None) -> None:
        self.settings, self.bans, self.gate, self.tally = settings, bans, gate, tally
        self.clock, self.hosts_deny = clock, hosts_deny
        # Sends this host's ban of an address again, after the stale lift of it in the stream.
        self.resend = resend

    def apply_active(self, batches: Iterable[list[bytes]]) -> tuple[int, int]:
        """Signed decisions of the active set: verified and guarded like stream entries, except
        the rate cap (this is state the fleet already holds, not news). Each batch is checked as
        it is read, and only the bans that pass are kept until the kernel takes them all at once:
        anyone who can write to the hash can fill it with junk. How many were made here, and of
        how many read."""
        now = self.clock()
        wanted: list[RemoteBan] = []
        total = 0
        for values in batches:
            total += len(values)
            wanted += self._active_bans(values, now)
        made = adopt_bans(self.bans, self._not_lifted_here(wanted), now, self.hosts_deny, kernel_first=True)
        self.tally.count("applied", len(made))
        return len(made), total

    def _active_bans(self, values: list[bytes], now: float) -> list[RemoteBan]:
        wanted: list[RemoteBan] = []
        for value in values:
            try:
                decision = unpack(value, self.settings.key, self.settings.name)
            except BadDecision as error:
                self.tally.refused(error.reason, None, str(error))
                continue
            if decision.kind != "ban":
                continue
            verdict = self.gate.check(decision, now, live=False)
            if verdict == ECHO:
                continue
            if verdict is not None:
                self.tally.refused(verdict, decision)
                continue
            wanted.append(RemoteBan(decision.address, reachable(decision.expires), decision.host,
                                    fleet_reason(decision)))
        return wanted

    def apply_entries(self, entries: Entries, past: int = 0) -> None:
        """Stream entries in order: runs of bans in one batch, lifts one by one between them. The
        first `past` are the fleet's past, read again after loading the active set: the rate cap
        does not count them. If applying fails (the store busy or full), the entries are read
        again, so the replay order taken from them is put back: the second reading must not look
        like a replay."""
        seen = dict(self.gate.seen)
        try:
            self._apply_entries(entries, past)
        except BaseException:
            self.gate.seen = seen
            raise

    def _apply_entries(self, entries: Entries, past: int) -> None:
        now = self.clock()
        run: list[tuple[Decision, RemoteBan]] = []
        for index, (_entry_id, fields) in enumerate(entries):
            try:
                decision = decode(fields, self.settings.key, self.settings.name)
            except BadDecision as error:
                self.tally.count("received")
                self.tally.refused(error.reason, None, str(error))
                continue
            verdict = self.gate.check(decision, now, capped=index >= past)
            if verdict == ECHO:
                continue
            self.tally.count("received")
            if verdict is not None:
                self.tally.refused(verdict, decision)
                continue
            if decision.kind == "ban":
                run.append((decision, RemoteBan(decision.address, reachable(decision.expires), decision.host,
                                                fleet_reason(decision))))
                continue
            self._apply_bans(run, now)
            run = []
            if self._banned_here_since(decision):
                self.tally.refused("stale", decision)
                # The other hosts took the lift, this host's newer ban of the address with it
                # (theirs came from here): sent again, after the lift, it is theirs again.
                if self.resend is not None:
                    self.resend(decision.address)
                continue
            if lift_remote(self.bans, decision.address, decision.host, now):
                self.tally.count("applied")
        self._apply_bans(run, now)

    def _apply_bans(self, run: list[tuple[Decision, RemoteBan]], now: float) -> None:
        if not run:
            return
        made = adopt_bans(self.bans, self._not_lifted_here([ban for _d, ban in run]), now, self.hosts_deny)
        done = self.clock()
        self.tally.count("applied", len(made))
        if made:
            self.tally.lag(max(0.0, done - max(d.at for d, _b in run)))
        origins = {ban.address: ban.origin for _d, ban in run}
        if len(made) <= LIVE_LOG_LIMIT:
            for ban in made:
                self.tally.log(f"attackalert: Host {ban.address} has been blocked via fleet "
                               f"(from {origins.get(ban.address, '?')})")
        else:
            self.tally.log(f"attackalert: {len(made)} hosts have been blocked via fleet")

    def _banned_here_since(self, lift: Decision) -> bool:
        """Whether this host's own detection or admin banned (or renewed the ban of) the lift's
        address after the lift was decided: a lift read late, after a Redis outage, knew nothing
        of that ban. Bans taken from peers are lifted as ever: their time here is when they were
        applied, not when they were decided. The lift's time is the peer's clock, so only a ban
        newer by more than CLOCK_SKEW counts: an admin's quick unblock of a mistake, read by a
        host whose clock runs ahead, must still lift it here."""
        held = self.bans.store.get(lift.address)
        return held is not None and held.origin == ORIGIN_LOCAL and held.last_seen > lift.at + CLOCK_SKEW

    def _not_lifted_here(self, wanted: list[RemoteBan]) -> list[RemoteBan]:
        """`wanted` without the bans an admin lifted here only (`unblock --local`) that their
        origin sends again unchanged, as it does after Redis lost data. A ban extended since, or
        banned again after the origin lifted it, is another ban and is made."""
        lifted = self.bans.store.lifted_here(ban.address for ban in wanted) if wanted else {}
        return [ban for ban in wanted if not same_ban(lifted.get(ban.address), ban)]


def same_ban(lifted: tuple[str, float | None] | None, ban: RemoteBan) -> bool:
    """Whether `ban` is the one lifted here, (origin, expiry): the expiry has been through this
    host's clock arithmetic (a duration from now, then now plus it), so it is compared to within
    SAME_EXPIRY. A new ban of the origin ends later than that: it started after the old one."""
    if lifted is None or lifted[0] != ban.origin:
        return False
    if lifted[1] is None or ban.expires is None:
        return lifted[1] is None and ban.expires is None
    return abs(lifted[1] - ban.expires) < SAME_EXPIRY


def fleet_reason(decision: Decision) -> str:
    return f"fleet: {decision.reason or 'ban'}"[:120]
