"""The ban store: which addresses are banned, until when, how often they offended and which
hosts.deny lines we wrote, kept in SQLite so bans survive restarts and expire on time.

Design
- One SQLite file (default /var/lib/portsentry/bans.sqlite3) shared by the daemon and the CLI,
  possibly at the same time. Every change runs in one `BEGIN IMMEDIATE` transaction, which takes
  the database's write lock before reading, so two writers never act on the same stale read and
  no update is lost; a writer waits for the other up to BUSY_TIMEOUT. WAL lets readers go on
  while one writes.
- Schema versions live in `PRAGMA user_version`; MIGRATIONS lists the scripts that take the file
  from version n-1 to n and `schema_migrations` records when each ran. A file from a newer
  portsentry is refused rather than half-understood.
- Addresses are stored as the text of the ipaddress object; IPv4-mapped IPv6 (::ffff:a.b.c.d) is
  the IPv4 address, so one host is one row whichever socket family saw it.
- `bans` holds bans until they are lifted, including expired ones the daemon has not lifted
  yet; lifting moves the count of bans to `offenders` (escalation outlives the ban) and `history`
  keeps what happened. `bans.hosts_deny_line` is the line a ban wants in hosts.deny;
  `written_lines` holds the copies we appended ourselves (one row per line and address), so
  lifting, restore and `hosts-deny tidy` touch only those: an identical line the admin or
  fail2ban wrote first is theirs. Rows written by schema-1 versions, which recorded the line
  before checking the file, are taken as ours.
- `history` is also the change feed: every ban, extension, lift and expiry is a row with a
  monotonic id, its origin (this host, an admin, later a fleet peer) and the ban's expiry. A
  consumer keeps the last id it applied and asks `changes(after=id)`, which seeks by primary key,
  so following the feed costs what changed, not what is banned. `prune` bounds history and
  offenders by age and count; a consumer that fell behind what is kept re-reads `active`.
- The connection is shared by the daemon's threads, so calls are serialised with a lock.
- One class, BanStore, because it owns the one connection, its lock and every transaction, so
  each write is one BEGIN IMMEDIATE on it; its parts live beside it: the connection and the row
  format in bans.connection, the writes to bans (ban, extend, lift) in bans.writes, the history,
  change feed, hits and pruning in bans.feed, the hosts.deny lines we own in bans.owned_lines.
  This module opens and closes the file and answers the reads. The records it hands out and
  their pure rules are in bans.records, the schema scripts in bans.schema.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
from collections.abc import Iterable
from ipaddress import ip_address

from portsentry.bans.connection import ACTIVE, BAN_COLUMNS, CHUNK, ban_from_row, busy, store_errors
from portsentry.bans.feed import Feed
from portsentry.bans.owned_lines import OwnedLines
from portsentry.bans.records import DEFAULT_MAX_ROWS as DEFAULT_MAX_ROWS
from portsentry.bans.records import DEFAULT_RETENTION as DEFAULT_RETENTION
from portsentry.bans.records import EVENT_KINDS as EVENT_KINDS
from portsentry.bans.records import ORIGIN_LOCAL as ORIGIN_LOCAL
from portsentry.bans.records import ORIGIN_LOCAL_ONLY as ORIGIN_LOCAL_ONLY
from portsentry.bans.records import POLICY as POLICY
from portsentry.bans.records import ROUTE_MARK as ROUTE_MARK
from portsentry.bans.records import Ban as Ban
from portsentry.bans.records import BanRequest as BanRequest
from portsentry.bans.records import Change as Change
from portsentry.bans.records import Event as Event
from portsentry.bans.records import EventKind as EventKind
from portsentry.bans.records import StoreError as StoreError
from portsentry.bans.records import ban_duration as ban_duration
from portsentry.bans.records import normalise as normalise
from portsentry.bans.records import stored_address as stored_address
from portsentry.bans.schema import MIGRATIONS as MIGRATIONS
from portsentry.bans.schema import SCHEMA_VERSION as SCHEMA_VERSION
from portsentry.bans.schema import SchemaTooNew, migrate
from portsentry.bans.writes import BanWrites
from portsentry.core.probe import IPAddress

DEFAULT_PATH = "/var/lib/portsentry/bans.sqlite3"
# Milliseconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_MS = 10_000
WAL_SIZE_LIMIT = 4 << 20  # bytes of WAL kept after a checkpoint (SQLite's auto-checkpoint: ~4 MB)
MEMORY = ":memory:"  # a store that lives only as long as the process (the daemon's fallback)


class BanStore(BanWrites, Feed, OwnedLines):
    """The ban store in one SQLite file; safe to share between processes and threads."""

    def __init__(self, path: str = DEFAULT_PATH, reports: bool = True) -> None:
        """`reports`: this process writes the event and counts the metric of each change it
        makes (the daemon). The command line working on the store directly has no event log or
        metrics of its own: its changes are left unreported, for the daemon (`claim_unreported`)."""
        self.path = path
        self._reported = 1 if reports else 0
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        try:
            if path != MEMORY:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                # Created here rather than by SQLite so it starts out 0600 whatever the umask.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.close(fd)
        except FileExistsError as exc:  # makedirs: a file (or a dangling link) where the directory goes
            raise StoreError(f"{path}: cannot create the ban store: {exc.filename} is not a directory "
                             "(STATE_DIR)") from exc
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the ban store: {exc.strerror}") from exc
        try:
            self._db = sqlite3.connect(
                path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # transactions are explicit (BEGIN IMMEDIATE)
                check_same_thread=False,  # the lock below serialises the daemon's threads
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the ban store: {exc}") from exc
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if path != MEMORY:
                self._db.execute("PRAGMA journal_mode = WAL")
                # WAL + NORMAL: a commit survives the process being killed (the fault that
                # matters here) without an fsync on the path of every ban.
                self._db.execute("PRAGMA synchronous = NORMAL")
                # Without a limit the WAL keeps the size of its largest transaction for ever: a
                # `block --file` of 100,000 addresses left a 25 MB -wal file behind. With one, the
                # first write after a checkpoint cuts it back.
                self._db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if busy(exc):
                # Another writer, not a damaged file: "move it away" would lose every ban.
                raise StoreError(f"{path}: busy: another process has held its write lock for over "
                                 f"{BUSY_TIMEOUT_MS / 1000:g} s; try again") from exc
            raise StoreError(
                f"{path}: not a usable ban store ({exc}); move it away and portsentry starts a new one"
            ) from exc
        except BaseException:
            self._db.close()
            raise

    # -- schema ------------------------------------------------------------------------------

    def _migrate(self) -> None:
        # Read first, without the write lock: a store that needs nothing is opened (for `list`,
        # `status`) while another process is in a long write. migrate() checks again under it.
        if int(self._db.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
            return
        with self._transaction() as db:
            try:
                migrate(db)
            except SchemaTooNew as error:
                raise StoreError(f"{self.path}: {error}; run the newer portsentry or move the file "
                                 "away") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @store_errors
    def close_held(self, now: float) -> tuple[list[Ban], list[tuple[IPAddress, str, float]]]:
        """The bans in force at `now` and the hosts.deny lines that are ours (address, line,
        written at), then closed in the same hold of the lock: an in-memory stand-in handing
        over to the disk, whose late writes must fail (their callers keep and retry them)
        rather than land after the read and be lost with it."""
        with self._lock:
            rows = self._db.execute(f"SELECT {BAN_COLUMNS} FROM bans WHERE {ACTIVE} "
                                    "ORDER BY first_seen, address", (now,)).fetchall()
            lines = self._db.execute("SELECT address, line, written_at FROM written_lines "
                                     "ORDER BY written_at").fetchall()
            self._db.close()
        return [ban_from_row(r) for r in rows], [(ip_address(a), line, at) for a, line, at in lines]

    def __enter__(self) -> BanStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads -------------------------------------------------------------------------------

    @store_errors
    def get(self, address: IPAddress | str) -> Ban | None:
        """The ban of `address` still in the table (it may have expired), or None."""
        key = str(normalise(address))
        with self._lock:
            return self._get(self._db, key)

    @store_errors
    def get_many(self, addresses: Iterable[IPAddress]) -> list[Ban]:
        """The bans still in the table for those of `addresses` that have one."""
        keys = [str(normalise(a)) for a in addresses]
        found: list[Ban] = []
        with self._lock:
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start:start + CHUNK]
                marks = ",".join("?" * len(chunk))
                found += [ban_from_row(row) for row in self._db.execute(
                    f"SELECT {BAN_COLUMNS} FROM bans WHERE address IN ({marks})", chunk)]
        return found

    @store_errors
    def active(self, now: float) -> list[Ban]:
        """Bans in force at `now`, oldest first."""
        return self._select(f"WHERE {ACTIVE} ORDER BY first_seen, address", (now,))

    @store_errors
    def active_count(self, now: float) -> int:
        with self._lock:
            row = self._db.execute(f"SELECT count(*) FROM bans WHERE {ACTIVE}", (now,)).fetchone()
        return int(row[0])

    @store_errors
    def active_routed(self, now: float) -> list[tuple[IPAddress, int, str]]:
        """(address, port, mode) of every ban in force that KILL_ROUTE ran for (ROUTE_MARK)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT address, port, mode FROM bans WHERE {ACTIVE} AND EXISTS "
                "(SELECT 1 FROM json_each(bans.backends) WHERE value = ?)", (now, ROUTE_MARK)
            ).fetchall()
        return [(stored_address(a), port, mode) for a, port, mode in rows]

    @store_errors
    def active_packed(self, now: float) -> list[tuple[bytes, float | None]]:
        """(packed address, expires) of every ban in force: what the kernel sets and the engine
        need at start, without an address object per row (a million bans)."""
        with self._lock:
            rows = self._db.execute(f"SELECT address, expires FROM bans WHERE {ACTIVE}", (now,)).fetchall()
        pton, v4, v6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
        return [(pton(v6 if ":" in a else v4, a), e) for a, e in rows]

    @store_errors
    def active_lines(self, now: float) -> list[tuple[IPAddress, str]]:
        """(address, hosts.deny line) of every ban in force that has a line."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT address, hosts_deny_line FROM bans WHERE hosts_deny_line IS NOT NULL AND {ACTIVE}",
                (now,)).fetchall()
        return [(stored_address(a), line) for a, line in rows]

    @store_errors
    def expired(self, now: float) -> list[Ban]:
        """Bans past their expiry at `now` that nobody has lifted yet, earliest expiry first."""
        return self._select("WHERE expires IS NOT NULL AND expires <= ? ORDER BY expires, address", (now,))

    @store_errors
    def offences(self, address: IPAddress | str, now: float | None = None) -> int:
        """Bans of `address` that are over, for escalation: lifted ones, plus, given `now`, one
        still in the table but expired by then."""
        key = str(normalise(address))
        with self._lock:
            past = self._past_offences(self._db, key)
            if now is not None:
                current = self._get(self._db, key)
                if current is not None and not current.active(now):
                    past = max(past, current.offences)
        return past
