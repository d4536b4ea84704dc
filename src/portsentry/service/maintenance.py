"""The maintenance thread: once a second, the work that keeps bans and guards current.

Threads and ownership: this thread owns the cursor into the ban store's change feed, and reports
the changes in it that the command line made without the daemon (bans.others). It calls
the ban lifecycle (BanManager, thread-safe) to lift expired bans, save records a full disk held
back, rebuild a flushed table (once a minute) and prune old history (a minute after the start,
then once an hour); it re-reads the default gateways and DNS resolvers. It never touches the
engine: what it found is handed to the main loop as `Findings`, which applies them there.

Before, the daemon's tick read every active ban from the store and re-synced the engine with all
of them every second (a whole core at 100,000 bans). Following the feed costs what changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from portsentry.bans.lifecycle import BanManager
from portsentry.bans.others import report_others
from portsentry.bans.store import Change, StoreError
from portsentry.core import messages
from portsentry.core.probe import IPAddress
from portsentry.journal.hits import HitTally

FEED_BATCH = 10_000  # changes read per round; a larger backlog is read over the next rounds
# A wall clock set back by more than this between two rounds (beyond what the monotonic clock
# saw pass) re-times the kernel's bans; NTP's slewing moves it by well under a second a round.
CLOCK_STEP = 2.0

Logger = Callable[[str], None]


@dataclass(frozen=True)
class Findings:
    """What one round found, for the main loop."""

    # (address, banned) in feed order: True = a ban was made or extended, False = lifted.
    changes: list[tuple[IPAddress, bool]] = field(default_factory=list)
    # Every active ban, when the feed could not be followed (its history was pruned past us).
    resync: frozenset[IPAddress] | None = None
    protected: frozenset[IPAddress] | None = None
    active: int | None = None  # bans in force, for status and the gauges


class Maintenance:
    def __init__(
        self,
        bans: BanManager | None,
        protected: Callable[[], frozenset[IPAddress]],
        post: Callable[[Findings], None],
        log: Logger,
        interval: float = 1.0,
        repair_every: float = 60.0,
        prune_every: float = 3600.0,
        clock: Callable[[], float] = time.time,
        settle: Callable[[float], None] | None = None,
        tally: HitTally | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bans = bans
        self.tally = tally  # hit aggregates for reports (journal.hits), written once a round
        self._settle = settle  # the kernel's first-probe bans (service.kernelbans)
        self._protected = protected
        self._post = post
        self._log = log
        self.interval = interval
        self.repair_every = repair_every
        self.prune_every = prune_every
        self._clock = clock
        self._monotonic = monotonic
        self.cursor = 0
        self.active = 0
        self.errors = 0
        now = clock()
        self._next_repair = now + repair_every
        # The first prune a minute in (the start's own work done), then every prune_every: an hour
        # first held it off for every daemon restarted more often, which then never pruned.
        self._next_prune = now + min(repair_every, prune_every)
        # Wall clock minus monotonic clock: it falls when the wall clock is set back.
        self._offset = now - monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, cursor: int, active: int) -> None:
        """Follow the feed from `cursor` (the state the engine was given at start)."""
        self.cursor, self.active = cursor, active
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run a round now (an admin command changed the store)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._post(self.run_once())
            except Exception as error:  # said, and the next round runs
                self.errors += 1
                self._log(messages.config_error(f"internal error in the maintenance tick: {error!r}"))
            self._wake.wait(max(0.0, self.interval - (time.monotonic() - started)))
            self._wake.clear()

    def run_once(self) -> Findings:
        """One round; every part is guarded, so one failure does not skip the others."""
        now = self._clock()
        changes: list[tuple[IPAddress, bool]] = []
        resync: frozenset[IPAddress] | None = None
        bans = self.bans
        offset = now - self._monotonic()
        set_back = offset < self._offset - CLOCK_STEP
        self._offset = offset
        if bans is not None:
            # First: a ban `block --file` made is said before its expiry is.
            self.report_others()
            if set_back:
                self._guard(lambda: bans.retime(now))
            if due(now, self._next_repair, self.repair_every):
                self._next_repair = now + self.repair_every
                self._guard(lambda: bans.repair(now))
            self._guard(bans.catch_up)
            self._guard(lambda: bans.expire(now))
            if due(now, self._next_prune, self.prune_every):
                self._next_prune = now + self.prune_every
                self._guard(lambda: bans.prune(now))
            if self.tally is not None:
                self._guard(lambda: self._write_hits(bans))
            if self._settle is not None:
                settle = self._settle
                self._guard(lambda: settle(now))
            try:
                changes, resync = self._follow(now)
            except StoreError as error:  # the store may be unreadable for a while (disk full)
                self._log(messages.store_failed(str(error)))
        protected: frozenset[IPAddress] | None = None
        try:
            protected = self._protected()
        except Exception as error:
            self.errors += 1
            self._log(messages.config_error(f"cannot refresh gateways and resolvers: {error!r}"))
        return Findings(changes, resync, protected, self.active if bans is not None else None)

    def _follow(self, now: float) -> tuple[list[tuple[IPAddress, bool]], frozenset[IPAddress] | None]:
        assert self.bans is not None
        store = self.bans.store
        batch = store.changes(after=self.cursor, limit=FEED_BATCH)
        if batch and batch[0].id != self.cursor + 1 and self.cursor:
            # Pruned past our cursor: start again from the whole state.
            self.cursor = store.last_change()
            active = store.active(now)
            self.active = len(active)
            return [], frozenset(ban.address for ban in active)
        changes: list[tuple[IPAddress, bool]] = []
        for change in batch:
            changes.append((change.address, change.bans))
            self.active += _count(change)
            self.cursor = change.id
        return changes, None

    def report_others(self) -> None:
        """The events and counts of the changes the command line made on the store directly (at
        the start, before the thread runs, and at each round)."""
        if self.bans is None:
            return
        try:
            report_others(self.bans)
        except StoreError as error:  # claimed at a later round, when the store can be written
            self._log(messages.store_failed(str(error)))
        except Exception as error:
            self.errors += 1
            self._log(messages.config_error(f"internal error in the maintenance tick: {error!r}"))

    def _write_hits(self, bans: BanManager) -> None:
        assert self.tally is not None
        rows, refused = self.tally.drain()
        names = self.tally.drain_names()
        if not rows and not refused and not names:
            return
        try:
            bans.store.add_hits(rows, refused, names)
        except StoreError as error:  # kept for the next round; the store reports the failure
            self.tally.restore(rows, refused)
            self.tally.restore_names(names)
            self._log(messages.store_failed(str(error)))

    def _guard(self, work: Callable[[], object]) -> None:
        try:
            work()
        except Exception as error:
            self.errors += 1
            self._log(messages.config_error(f"internal error in the maintenance tick: {error!r}"))


def due(now: float, next_at: float, every: float) -> bool:
    """Whether work planned for `next_at` is due at `now`. Also when `next_at` lies more than
    one interval ahead: the clock was set back since, and waiting for it again would hold the
    work off for as long as the clock jumped."""
    return now >= next_at or next_at - now > every


def _count(change: Change) -> int:
    """How a change moves the number of bans in force."""
    if change.kind == "ban":
        return 1
    if change.kind in ("lift", "expire"):
        return -1
    return 0
