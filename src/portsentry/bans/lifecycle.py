"""The ban lifecycle: how long a ban lasts, putting it in the native backend, lifting it again.

The ban store is the shared truth between the daemon, the `block`/`unblock`/`list` commands and
the fleet: whoever bans or lifts writes the store and changes the kernel and hosts.deny. Every
change is a row of the store's change feed (history); the daemon's maintenance thread follows it
and tells the engine about bans made or lifted behind its back, and `on_change` wakes the fleet
publisher, which sends this host's own changes (origin "local") to its peers.

A ban made here is recorded before any step runs (`enforce`) and dropped again when every step
failed; a block that only runs KILL_RUN_CMD (BLOCK_x=2) is no ban and records nothing. A fleet
peer's ban (bans.adopt) goes to the kernel first and runs no KILL_ROUTE or KILL_RUN_CMD, here or
after a reboot (bans.restore). Lifting removes an address from everything that holds it: the
native backend, the exact hosts.deny line we wrote, and whatever KILL_ROUTE_UNDO undoes; a lift
carries its origin so that a peer's unblock is not sent back.

Every transition of a ban (recorded, applied, held in memory until the store takes it, extended,
lifted, expired) goes through this one object, BanManager, and its locks, so that the races
between them are seen in one place. Its state, and the helpers all of its parts use, are declared
in bans.manager_state; its parts: recording a ban and its hosts.deny lines, with the in-memory
fallback and its replay to disk, in bans.recording; lifts and expiry in bans.lifts; the native
backend's side (a ban's kernel add, BAN_RATE_LIMIT's kernel slots, the kernel's first-probe bans
recorded late, the table's repair) in bans.native. This module makes the ban (`enforce`). The
parts that need none of its state live beside it (bans.turns, bans.restore, bans.bulk,
bans.adopt, bans.records).
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from portsentry.bans.connection import describe_expiry
from portsentry.bans.lifts import Lifts
from portsentry.bans.lifts import mode_of as mode_of
from portsentry.bans.manager_state import Logger, Runner
from portsentry.bans.native import NativeBans
from portsentry.bans.recording import _Unsaved
from portsentry.bans.recording import open_store as open_store
from portsentry.bans.records import MANUAL_REASON, TimeChange, ban_reason, holder_of, time_change
from portsentry.bans.store import (
    DEFAULT_MAX_ROWS,
    DEFAULT_RETENTION,
    BanStore,
    StoreError,
)
from portsentry.bans.turns import AddressTurns
from portsentry.config.settings import Config
from portsentry.core import messages
from portsentry.core.actions import Block, StepKind
from portsentry.core.probe import IPAddress
from portsentry.journal.failures import WriteFailures
from portsentry.journal.telemetry import Telemetry
from portsentry.responders.backend import BanBackend
from portsentry.responders.classic import ClassicResponder, StepFailure
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import run_shell


@dataclass(frozen=True)
class BanPolicy:
    base: int = 0  # BLOCK_TIME seconds; 0 = forever
    factor: float = 2.0
    cap: int = 7 * 86400
    undo: str | None = None  # KILL_ROUTE_UNDO
    command_timeout: float = 30.0
    route: str | None = None  # KILL_ROUTE, re-run at start when the kernel forgot its effect
    history_retention: float = DEFAULT_RETENTION
    history_max_rows: int = DEFAULT_MAX_ROWS

    @classmethod
    def from_config(cls, config: Config) -> BanPolicy:
        return cls(config.block_time, config.block_time_factor, config.block_time_max,
                   config.kill_route_undo, config.command_timeout, config.kill_route,
                   float(config.history_retention), config.history_max_rows)


def time_said(change: TimeChange) -> str:
    """The one line of a block by hand of an address banned already (BanManager.block_by_hand)."""
    if change.changed:
        return messages.ban_time_changed(str(change.address), describe_expiry(change.old_end),
                                         describe_expiry(change.new_end))
    return messages.ban_time_kept(str(change.address), describe_expiry(change.old_end),
                                  describe_expiry(change.asked_end))


class UsePolicy(enum.Enum):
    """Marks "no override": the ban lasts as long as BLOCK_TIME and escalation say."""

    YES = "yes"


USE_POLICY = UsePolicy.YES


class BanManager(NativeBans, Lifts):
    """Thread-safe: responder threads ban, the expiry tick and the CLI lift."""

    def __init__(
        self,
        store: BanStore,
        backend: BanBackend | None,
        hosts_deny: HostsDeny,
        policy: BanPolicy,
        log: Logger,
        runner: Runner = run_shell,
        telemetry: Telemetry | None = None,
        failures: WriteFailures | None = None,
    ) -> None:
        self.store = store
        self.failures = failures
        self.backend = backend
        self.hosts_deny = hosts_deny
        self.policy = policy
        self._log = log
        self.log = log  # for the lifecycle's other parts (bulk), which report the same way
        self._run = runner
        self.run = runner  # the shell runner, for the lifecycle's other parts (restore, bulk)
        self._lock = threading.Lock()
        self._turns = AddressTurns()  # bans and lifts of one address take turns (bans.turns)
        # Records (and hosts.deny lines) the store could not take yet: appended to by the threads
        # that ban, emptied by the maintenance thread's catch_up and by lifts (admin, fleet); both
        # lists change only under _unsaved_lock, which is never held for I/O.
        self._unsaved: list[_Unsaved] = []
        self._unsaved_lines: list[tuple[IPAddress, str, float]] = []
        self._unsaved_lock = threading.Lock()
        # Set when the store on disk could not be opened and an in-memory one stands in.
        self.fallback_from: str | None = None
        self.fallback_error: str | None = None  # why fallback_from could not be opened, for status
        self.telemetry = telemetry or Telemetry()
        # Called after every ban or lift this manager records, from the thread that made it: the
        # fleet publisher wakes at once instead of at its next look at the change feed.
        self.on_change: Callable[[], None] | None = None
        # Lifts that forgot caught entries (not expiry), counted under _lock once they are gone:
        # settling a kernel ban late reads it before the caught entries, and a change tells it
        # that an entry it read may have been unblocked since (record_kernel_ban's `still`).
        self.unblocks = 0
        # Set when a removal from the native backend failed: the kernel may hold a ban the store
        # no longer lists, so the next start must not take the sets as they are (bans.restore).
        self.kernel_unsure = False

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off lifts while a batch of peers' bans goes into the kernel and then the store
        (bans.adopt), or stored bans go back into the kernel (bans.restore): an unblock in between
        took the address out of the kernel, and the batch put it back or recorded it after. Not
        per address: a batch can hold 100,000. A lift holds it from its kernel removal to its
        record, and a scan's kernel add (ban_native) for its read of the record and its add; no
        shell command runs under it."""
        with self._lock:
            yield

    @contextlib.contextmanager
    def while_banned(self, address: IPAddress, now: float) -> Iterator[bool]:
        """Hold `address` against lifts and say whether its ban is still in force: a step done
        again for a ban (KILL_ROUTE after a reboot) must not come after the ban's lift."""
        with self._turns.turn(address):
            try:
                ban = self.store.get(address)
            except StoreError as error:
                self._store_failed(error)
                yield True  # unknown: doing it again is the lesser harm
                return
            yield ban is not None and ban.active(now)

    def enforce(self, block: Block, responder: ClassicResponder,
                duration: float | UsePolicy | None = USE_POLICY, now: float | None = None,
                counted: bool = False, failed: list[StepFailure] | None = None) -> bool | None:
        """The one way a ban is made, by a scan or by hand: record it, run the block's steps, and
        drop the record again if every step failed; a block of KILL_RUN_CMD alone only runs it.
        `duration` overrides the policy (seconds, or None = forever). `counted`: a scan's ban,
        under BAN_RATE_LIMIT, which the kernel's cap must let in too (_claim_slot). True when
        done, False when it failed, None when the cap refused it before anything ran (said).
        The steps that failed, with the lines said of them, go to `failed` too."""
        if all(step.kind is StepKind.RUN_CMD for step in block.steps):
            # BLOCK_x = 2 (1.2: run KILL_RUN_CMD, block nothing): no ban to record. Recorded, it
            # was put in the native set and given KILL_ROUTE at the next start, listed, sent to
            # fleet peers as a ban and undone with KILL_ROUTE_UNDO at its end.
            carried = responder.run_steps(block, None)
            if failed is not None:
                failed += carried.failed
            return carried.done
        at = time.time() if now is None else now
        with self._turns.turn(block.probe.source):
            return self._enforce(block, responder, duration, at, counted, failed)

    def block_by_hand(self, block: Block, responder: ClassicResponder, duration: float | None,
                      now: float, failed: list[StepFailure]) -> bool | TimeChange:
        """An admin's `block`: a ban made as `enforce` makes it (True when done) or, for an
        address banned already, its end moved (the later end holds): a TimeChange, said in one
        line, with no step run again but the native set's, which times its entries itself.
        hosts.deny got its line and KILL_ROUTE ran at the ban, and neither has an end."""
        address = block.probe.source
        with self._turns.turn(address):
            try:
                ban = self.store.get(address)
            except StoreError:
                ban = None  # the ban says what is wrong with the store
            if ban is None or not ban.active(now):
                return self._enforce(block, responder, duration, now, False, failed) is True
            change = time_change(ban, duration, now)
            if not change.changed:
                self._log(time_said(change))
                return change
            saved = self.store.set_end(address, change.new_end, now)  # a StoreError says why not
            if saved is None:  # cannot be: the address's bans and lifts wait for this turn
                return self._enforce(block, responder, duration, now, False, failed) is True
            self.changed()
            self._log(time_said(change))
            left = None if change.new_end is None else change.new_end - now
            if self.backend is not None and self.backend.name in saved.backends:
                lines: list[str] = []
                if not self.ban_native(address, left, lines, retimed=True):
                    failed.append(StepFailure(StepKind.NATIVE, tuple(lines)))
            self.telemetry.ban(address, holder_of(saved, None), left, MANUAL_REASON, now,
                               count=max(saved.offences - 1, 0), new=False)
            return change

    def _enforce(self, block: Block, responder: ClassicResponder, duration: float | UsePolicy | None,
                 at: float, counted: bool, failed: list[StepFailure] | None) -> bool | None:
        """enforce, in the address's turn."""
        probe = block.probe
        route = any(step.kind is StepKind.ROUTE for step in block.steps)
        if counted and not self._claim_slot(block):
            return None
        # A ban this block extends keeps the mark an earlier block's KILL_ROUTE earned.
        routed_before = route and self._routed(probe.source, at)
        if isinstance(duration, UsePolicy):
            duration = self.duration(probe.source, at)
        # Recorded before the kernel or hosts.deny is touched: a crash half-way leaves a record
        # that the next start completes (restore re-applies it), never a ban nobody knows of.
        saved = self.remember(probe.source, reason=probe.kind, mode=str(probe.mode), port=probe.port,
                              now=at, duration=duration, hosts_deny_line=responder.intended_line(block),
                              native=any(step.kind is StepKind.NATIVE for step in block.steps),
                              route=route)
        # A ban in force extended by this block counts its blocks on (a new one starts at 1):
        # no second read of the store on the way to KILL_ROUTE.
        extending = saved is not None and saved.count > 1
        if saved is not None:
            # The kernel gets the end the store keeps: extending a ban keeps the later end, and
            # an element re-added with this block's shorter time left the set while `list`
            # and the engine still held the address banned.
            duration = None if saved.expires is None else max(saved.expires - at, 1.0)
        carried = responder.run_steps(block, duration, self)
        if failed is not None:
            failed += carried.failed
        if route and not routed_before and StepKind.ROUTE not in carried.held_by:
            self._unmark_route(probe.source)
        if carried.done:
            self._said_ban(probe.source, carried.held_by, duration, ban_reason(probe), saved)
            return True
        # Only a ban this block made is dropped again. One it extended is still in force
        # through what its first block did (a KILL_ROUTE done again fails with "File
        # exists"): dropping the record left that in place with nothing listing it, and no
        # KILL_ROUTE_UNDO ever ran for it.
        if not extending:
            self.abandon(probe.source, at)
        return False

    def _routed(self, address: IPAddress, now: float) -> bool:
        try:
            ban = self.store.get(address)
        except StoreError:
            return False
        return ban is not None and ban.active(now) and ban.routed

    def prune(self, now: float) -> int:
        """Once an hour: forget history and offenders past their retention."""
        try:
            return self.store.prune(now, self.policy.history_retention, self.policy.history_max_rows)
        except StoreError as error:
            self._store_failed(error)
            return 0
