"""Lifting a ban: the address leaves everything that holds it. KILL_ROUTE_UNDO runs first (when
KILL_ROUTE ran for the ban, or nothing records the address at all); then, under the lock that
fleet batches, restores and every scan's kernel add wait for, a record still held in memory, the
native backend, the exact hosts.deny lines we appended, the kernel's caught entry, and last the
record, with its origin so that a fleet peer's unblock is not sent back. `expire` lifts every
ban whose time is up. Part of BanManager (bans.lifecycle); admin workers, the fleet, the command
line and the maintenance thread's expiry lift, each in turn with the bans of the address
(bans.turns).
"""

from __future__ import annotations

from portsentry.bans.recording import Recording
from portsentry.bans.store import ORIGIN_LOCAL, Ban, normalise
from portsentry.core import messages
from portsentry.core.actions import StepKind
from portsentry.core.probe import IPAddress, Mode
from portsentry.responders.backend import BackendError
from portsentry.responders.classic import StepFailure
from portsentry.responders.hostsdeny import HostsDenyError
from portsentry.responders.substitute import substitute


class Lifts(Recording):
    """BanManager's lifts and expiry."""

    def lift(self, address: IPAddress, now: float, reason: str, origin: str = ORIGIN_LOCAL,
             expired_only: bool = False, failed: list[StepFailure] | None = None) -> bool:
        """Unblock everywhere; True when the store had a ban for it. `origin` says who asked: a
        fleet peer's lift is recorded as theirs, so this host does not publish it again. With
        `expired_only` (expiry), a ban made again or extended since it was seen over stays, and so
        does one being made right now: the next round looks again. The steps that failed, with
        the lines said of them, go to `failed` too: the lift is recorded all the same."""
        said: list[StepFailure] = [] if failed is None else failed
        with self._turns.turn(address, wait=not expired_only) as free:
            if not free:
                return False
            ban = self.store.get(address)
            if expired_only and (ban is None or ban.active(now)):
                return False
            key = normalise(address)
            with self._unsaved_lock:
                waiting = [] if expired_only else [e for e in self._unsaved if normalise(e.address) == key]
            # KILL_ROUTE_UNDO before the lock, which fleet batches, every other lift and every
            # scan's kernel add (ban_native) wait for: it may run for COMMAND_TIMEOUT. Whether
            # KILL_ROUTE ran for the ban cannot change meanwhile: bans of the address wait for
            # its turn, and a fleet peer's ban runs no KILL_ROUTE.
            self._undo_route(address, ban if ban is not None or not waiting else waiting[-1].as_ban(), said)
            with self._lock:
                ban = self.store.get(address)  # a fleet batch may have banned it again meanwhile
                if expired_only and (ban is None or ban.active(now)):
                    return False
                # A ban still waiting to be saved (the store could not be written) goes too: saved
                # after this, it would be a record of a ban that the kernel no longer holds.
                with self._unsaved_lock:
                    waiting = ([] if expired_only
                               else [e for e in self._unsaved if normalise(e.address) == key])
                    self._unsaved = [e for e in self._unsaved if e not in waiting]
                self._undo(address, ban if ban is not None or not waiting else waiting[-1].as_ban(), said)
                if not expired_only:  # an expired ban's entry was settled long ago
                    self._forget_caught(address, said)
                    self.unblocks += 1  # after the entry went: see __init__
                lifted = self.store.lift(address, now, reason, origin, expired_only)
        if lifted is not None or waiting:
            self.changed()
            self._log(messages.unblocked(str(address), reason))
            self.telemetry.unban(address, reason, now)
        return lifted is not None or bool(waiting)

    def _failed(self, failed: list[StepFailure], kind: StepKind, line: str) -> None:
        self._log(line)
        failed.append(StepFailure(kind, (line,)))

    def _forget_caught(self, address: IPAddress, failed: list[StepFailure]) -> None:
        if self.backend is None:
            return
        try:
            self.backend.forget_caught([normalise(address)])
        except (BackendError, OSError) as error:
            self.kernel_unsure = True
            self._failed(failed, StepKind.NATIVE, messages.native_unblock_failed(str(address), str(error)))

    def _undo(self, address: IPAddress, ban: Ban | None, failed: list[StepFailure]) -> None:
        if self.backend is not None:
            try:
                self.backend.remove(address)
            except (BackendError, OSError) as error:
                self.kernel_unsure = True
                self._failed(failed, StepKind.NATIVE,
                             messages.native_unblock_failed(str(address), str(error)))
        # Only the copies we appended go; an identical line someone else wrote stays.
        for line in self._owned_lines(address):
            try:
                self.hosts_deny.remove(line)
            except (HostsDenyError, OSError, ValueError) as error:
                # Still recorded as ours, so `hosts-deny tidy` can take it out later.
                self._failed(failed, StepKind.HOSTS_DENY, messages.config_error(
                    f"cannot remove {line!r} from {self.hosts_deny.path}: {error}"))
            else:
                self._disown_line(address, line)

    def _undo_route(self, address: IPAddress, ban: Ban | None, failed: list[StepFailure]) -> None:
        # Only what KILL_ROUTE did here is undone. With no record at all (an address banned before
        # this store, by 1.2 or by hand) the admin's unblock still runs it, as it always did.
        if self.policy.undo and (ban is None or ban.routed):
            command = substitute(self.policy.undo, address, ban.port if ban else 0, mode_of(ban))
            result = self._run(command, self.policy.command_timeout)
            if not result.ok:
                self._failed(failed, StepKind.ROUTE, messages.command_failed(str(address), result.failure()))

    def expire(self, now: float) -> list[IPAddress]:
        """Lift every ban whose time is up; returns the addresses lifted."""
        lifted = []
        for ban in self.store.expired(now):
            if self.lift(ban.address, now, "ban expired", expired_only=True):
                lifted.append(ban.address)
        return lifted


def mode_of(ban: Ban | str | None) -> Mode:
    """The mode a ban (or its stored mode text) was made in; TCP when unknown."""
    text = ban.mode if isinstance(ban, Ban) else ban
    try:
        return Mode(text) if text is not None else Mode.TCP
    except ValueError:
        return Mode.TCP
