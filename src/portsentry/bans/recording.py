"""Recording a ban made here (`remember`) and the hosts.deny lines we append for it, and what
happens when the store cannot take them: the record or line is kept in memory (up to
UNSAVED_CAPACITY each) and the block itself stands; `catch_up`, once a second on the maintenance
thread, reopens a store that could not be opened at start (`open_store`'s in-memory stand-in)
and replays what was held to disk. Part of BanManager (bans.lifecycle).

The held records and lines are appended to by the threads that ban and emptied by catch_up and
by lifts (admin, fleet); both lists change only under _unsaved_lock, which is never held for I/O.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, replace

from portsentry.bans.manager_state import Logger, ManagerState
from portsentry.bans.records import BLOCK_FAILED
from portsentry.bans.store import MEMORY, ROUTE_MARK, Ban, BanStore, StoreError, normalise
from portsentry.core import messages
from portsentry.core.probe import IPAddress

UNSAVED_CAPACITY = 100_000


@dataclass(frozen=True)
class _Unsaved:
    address: IPAddress
    reason: str
    mode: str
    port: int
    now: float
    duration: float | None
    hosts_deny_line: str | None
    backends: tuple[str, ...]

    def as_ban(self) -> Ban:
        expires = None if self.duration is None else self.now + self.duration
        return Ban(self.address, self.reason, self.mode, self.port, self.now, self.now, 1, expires, 1,
                   self.hosts_deny_line, self.backends)


def open_store(path: str, log: Logger) -> tuple[BanStore, str | None, str | None]:
    """The ban store, or an in-memory stand-in, the path to retry and why, when it cannot be
    opened: detection and blocking must go on with a full or read-only disk."""
    try:
        return BanStore(path), None, None
    except StoreError as error:
        log(messages.store_failed(f"{error}; keeping bans in memory until it can be opened"))
        return BanStore(MEMORY), path, str(error)


class Recording(ManagerState):
    """BanManager's records and owned lines, with their in-memory fallback; BanManager.__init__
    sets the state declared here."""

    _unsaved: list[_Unsaved]
    _unsaved_lines: list[tuple[IPAddress, str, float]]
    _unsaved_lock: threading.Lock
    fallback_from: str | None
    fallback_error: str | None

    def unsaved(self) -> int:
        """Records (and hosts.deny lines of ours) held in memory until the store takes them."""
        with self._unsaved_lock:
            return len(self._unsaved) + len(self._unsaved_lines)

    def remember(
        self, address: IPAddress, *, reason: str, mode: str, port: int, now: float,
        duration: float | None, hosts_deny_line: str | None, native: bool, route: bool = False,
    ) -> Ban | None:
        """Record a ban made here; `route`: its steps run KILL_ROUTE (ROUTE_MARK)."""
        backends = ((self.backend.name,) if native and self.backend is not None else ()) + (
            (ROUTE_MARK,) if route else ())
        entry = _Unsaved(address, reason, mode, port, now, duration, hosts_deny_line, backends)
        try:
            saved = self._save(entry)
        except (StoreError, OSError) as error:
            # The block itself stands; its record is kept in memory and saved when the store
            # can be written again (disk full, read-only file system).
            self._store_failed(error, retry=True)
            with self._unsaved_lock:
                if len(self._unsaved) < UNSAVED_CAPACITY:
                    self._unsaved.append(entry)
            return None
        self.changed()
        return saved

    def _save(self, entry: _Unsaved) -> Ban:
        return self.store.ban(entry.address, reason=entry.reason, mode=entry.mode, port=entry.port,
                              now=entry.now, duration=entry.duration,
                              hosts_deny_line=entry.hosts_deny_line, backends=entry.backends)

    def own_line(self, address: IPAddress, line: str, now: float) -> None:
        """HostsDeny.add's `on_append`: the copy about to be appended is ours. Recorded before the
        write; if the store cannot take it, it is kept in memory and saved later."""
        try:
            self.store.own_line(address, line, now)
        except StoreError as error:
            self._store_failed(error, retry=True)
            with self._unsaved_lock:
                if len(self._unsaved_lines) < UNSAVED_CAPACITY:
                    self._unsaved_lines.append((address, line, now))

    def add_line(self, address: IPAddress, line: str, now: float) -> bool:
        """Append `line` to hosts.deny for `address`, recording it as ours only if we write it;
        False when an identical line was already there (someone else's)."""
        return self.hosts_deny.add(line, on_append=lambda: self.own_line(address, line, now))

    def _owned_lines(self, address: IPAddress) -> list[str]:
        """Every hosts.deny line we appended for `address`: not only its ban's last one, since
        a ban extended by a block with another port or mode ($PORT$, $MODE$) wrote one more."""
        key = normalise(address)
        with self._unsaved_lock:
            found = [text for a, text, _ in self._unsaved_lines if normalise(a) == key]
        try:
            found += [text for _a, text in self.store.owned_of([key])]
        except StoreError as error:
            self._store_failed(error)
        return list(dict.fromkeys(found))

    def _disown_line(self, address: IPAddress, line: str) -> None:
        with self._unsaved_lock:
            self._unsaved_lines = [entry for entry in self._unsaved_lines if entry[:2] != (address, line)]
        try:
            self.store.disown_line(address, line)
        except StoreError as error:
            self._store_failed(error)

    def _unmark_route(self, address: IPAddress) -> None:
        """Marked before it ran, as a crash may come in between: a KILL_ROUTE that failed did
        nothing for KILL_ROUTE_UNDO to take back (its "File exists" names a route someone else,
        such as 1.2, made)."""
        try:
            self.store.unmark_routed([address])
        except StoreError as error:
            self._store_failed(error)
        with self._unsaved_lock:
            self._unsaved = [replace(e, backends=tuple(b for b in e.backends if b != ROUTE_MARK))
                             if normalise(e.address) == normalise(address) else e for e in self._unsaved]

    def abandon(self, address: IPAddress, now: float) -> None:
        """A block whose every step failed: drop the record made before trying it."""
        try:
            self.store.lift(address, now, BLOCK_FAILED)
        except StoreError as error:
            self._store_failed(error)

    def catch_up(self) -> int:
        """Called once a second: reopen a store that could not be opened at start, and save
        records that could not be written; returns how many were saved."""
        if self.fallback_from is not None:
            try:
                disk = BanStore(self.fallback_from)
            except StoreError:
                return 0
            now = time.time()
            # Under the lock every lift holds for its store work, from the swap until the stand-
            # in's bans wait to be saved: a lift in between found them in neither store, and they
            # were saved after it. Read and closed at once: a write from a thread that took the
            # stand-in before the swap now fails (and is kept to retry), not lost after the read.
            with self._lock:
                # Its lines too: left behind, a line of ours was taken for someone else's and
                # stayed in hosts.deny after the ban's end.
                standing, lines = self.store.close_held(now)
                self.store, self.fallback_from, self.fallback_error = disk, None, None
                # Saved as made at first_seen, so its length counts from then: the time left from
                # now cut each ban short by its age (an hour's ban half an hour old ended at once).
                kept = [_Unsaved(ban.address, ban.reason, ban.mode, ban.port, ban.first_seen,
                                 None if ban.expires is None else ban.expires - ban.first_seen,
                                 ban.hosts_deny_line, ban.backends) for ban in standing]
                with self._unsaved_lock:
                    self._unsaved += kept
                    self._unsaved_lines += lines
            self._log(messages.store_recovered(disk.path))
        while True:
            with self._unsaved_lock:
                if not self._unsaved_lines:
                    break
                held = self._unsaved_lines[0]
            address, line, at = held
            try:
                self.store.own_line(address, line, at)
            except StoreError:
                break
            # By identity, not by index: a lift may have disowned lines (another thread) meanwhile.
            with self._unsaved_lock:
                still = any(entry is held for entry in self._unsaved_lines)
                self._unsaved_lines = [entry for entry in self._unsaved_lines if entry is not held]
            if not still:  # disowned while it was being saved: the store must not keep it as ours
                with contextlib.suppress(StoreError):
                    self.store.disown_line(address, line)
        saved = 0
        while True:
            with self._unsaved_lock:
                if not self._unsaved:
                    break
                entry = self._unsaved[0]
            # In turn with lifts of its address: an unblock drops the entry, and a save already
            # under way would put the ban back in the store after the lift. Not waited for (the
            # address's ban or lift may be running a command): the next round saves it.
            with self._turns.turn(entry.address, wait=False) as free:
                if not free:
                    break
                with self._unsaved_lock:
                    if not any(waiting is entry for waiting in self._unsaved):
                        continue  # lifted between the look and the turn
                try:
                    self._save(entry)
                except (StoreError, OSError, ValueError):
                    break
                with self._unsaved_lock:
                    self._unsaved = [waiting for waiting in self._unsaved if waiting is not entry]
            saved += 1
        return saved
