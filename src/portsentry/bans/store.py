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
- One class, over 400 lines, on purpose: it owns the one connection, its lock and every
  transaction, so each write is one BEGIN IMMEDIATE in one place. The records it hands out and
  their pure rules are in bans.records, the schema scripts in bans.schema.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from ipaddress import ip_address
from typing import ParamSpec, TypeVar, cast

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
from portsentry.core.probe import IPAddress
from portsentry.journal.hits import HitRow

DEFAULT_PATH = "/var/lib/portsentry/bans.sqlite3"
# Milliseconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_MS = 10_000



_BAN_COLUMNS = (
    "address, reason, mode, port, first_seen, last_seen, count, expires, offences, hosts_deny_line, "
    "backends, origin"
)
_HISTORY_INSERT = ("INSERT INTO history (at, kind, address, detail, origin, expires, reported) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)")
# A ban is active at time ? while its expiry lies after it (or it has none).
_ACTIVE = "(expires IS NULL OR expires > ?)"
WAL_SIZE_LIMIT = 4 << 20  # bytes of WAL kept after a checkpoint (SQLite's auto-checkpoint: ~4 MB)


def _describe_expiry(expires: float | None) -> str:
    if expires is None:
        return "forever"
    return "until " + time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(expires))


_CHUNK = 500  # addresses per IN (...) query, below SQLite's variable limit
MEMORY = ":memory:"  # a store that lives only as long as the process (the daemon's fallback)
_T = TypeVar("_T")
_P = ParamSpec("_P")


def _busy(error: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection holds the lock."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _store_errors(method: Callable[_P, _T]) -> Callable[_P, _T]:
    """SQLite failures at run time (disk full, read-only, corruption) become StoreError, which
    the daemon reports and survives; a raw sqlite3 exception would look like a bug."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            store = args[0]
            raise StoreError(f"{getattr(store, 'path', 'ban store')}: {exc}") from exc

    return wrapper


class BanStore:
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
            if _busy(exc):
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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # -- bans --------------------------------------------------------------------------------

    @_store_errors
    def ban(
        self,
        address: IPAddress | str,
        *,
        reason: str,
        mode: str,
        port: int,
        now: float,
        duration: float | None,
        hosts_deny_line: str | None = None,
        backends: Iterable[str] = (),
        origin: str = ORIGIN_LOCAL,
    ) -> Ban:
        """Ban `address` for `duration` seconds (None = forever), or extend its active ban.

        Extending counts the hit, moves last_seen and keeps the later expiry; reason, mode and
        port become the latest ones. A ban still in the table but expired counts as over: this
        is then a new offence.
        """
        request = BanRequest(normalise(address), reason, mode, port, duration, hosts_deny_line,
                             tuple(backends))
        with self._transaction() as db:
            return self._ban(db, request, now, origin)

    @_store_errors
    def ban_many(self, requests: Iterable[BanRequest], now: float, origin: str = ORIGIN_LOCAL,
                 policy: Callable[[int], float | None] | None = None) -> list[Ban]:
        """`ban` for many addresses in one transaction (`portsentry block --file`). A request
        whose duration is POLICY lasts `policy(earlier offences)` seconds (None: forever)."""
        with self._transaction() as db:
            return [self._ban(db, request, now, origin, policy) for request in requests]

    @_store_errors
    def ban_absent(self, requests: Iterable[BanRequest], now: float, origin: str,
                   keep_longer: bool = False) -> list[Ban]:
        """`ban_many` for addresses with no row in `bans` (a fleet host joining takes 100,000 at
        once): rows and history in bulk, five times faster than one `_ban` each. A request whose
        address has a row goes the ordinary way, in the same transaction; with `keep_longer`, not
        at all when that row's ban is in force and lasts at least as long (a fleet decision heard
        twice changes nothing)."""
        wanted = [(str(address), address, r) for r in requests for address in (normalise(r.address),)]
        made: list[Ban] = []
        texts: dict[object, str] = {}  # backends and expiries repeat: each is written once
        with self._transaction() as db:
            present: dict[str, float | None] = {}
            past: dict[str, int] = {}
            for start in range(0, len(wanted), _CHUNK):
                keys = [key for key, _a, _r in wanted[start:start + _CHUNK]]
                marks = ",".join("?" * len(keys))
                present.update(db.execute(
                    f"SELECT address, expires FROM bans WHERE address IN ({marks})", keys).fetchall())
                past.update(db.execute(
                    f"SELECT address, offences FROM offenders WHERE address IN ({marks})", keys).fetchall())
            rows, history = [], []
            for key, address, request in wanted:
                if key in present or isinstance(request.duration, str):
                    if keep_longer and key in present and _holds(present[key], request.duration, now):
                        continue
                    made.append(self._ban(db, request, now, origin))
                    continue
                if request.duration is not None and not request.duration > 0:
                    raise ValueError(f"ban duration must be positive seconds or None, not "
                                     f"{request.duration!r}")
                expires = None if request.duration is None else now + request.duration
                backends = tuple(dict.fromkeys(request.backends))
                ban = Ban(address, request.reason, request.mode, request.port, now, now, 1, expires,
                          past.get(key, 0) + 1, request.hosts_deny_line, backends, origin)
                present[key] = expires
                made.append(ban)
                if (backends_text := texts.get(backends)) is None:
                    backends_text = texts[backends] = json.dumps(list(backends))
                if (until := texts.get(expires)) is None:
                    until = texts[expires] = _describe_expiry(expires)
                rows.append((key, ban.reason, ban.mode, ban.port, now, now, 1, expires, ban.offences,
                             ban.hosts_deny_line, backends_text, origin))
                history.append((now, "ban", key, f"{ban.mode} port {ban.port}: {ban.reason}; {until}; "
                                f"offence {ban.offences}", origin, expires, self._reported))
            db.executemany(f"INSERT INTO bans ({_BAN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           rows)
            db.executemany(_HISTORY_INSERT, history)
        return made

    @_store_errors
    def get_many(self, addresses: Iterable[IPAddress]) -> list[Ban]:
        """The bans still in the table for those of `addresses` that have one."""
        keys = [str(normalise(a)) for a in addresses]
        found: list[Ban] = []
        with self._lock:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found += [_ban_from_row(row) for row in self._db.execute(
                    f"SELECT {_BAN_COLUMNS} FROM bans WHERE address IN ({marks})", chunk)]
        return found

    def _ban(self, db: sqlite3.Connection, request: BanRequest, now: float, origin: str,
             policy: Callable[[int], float | None] | None = None) -> Ban:
        addr = normalise(request.address)
        key = str(addr)
        old = self._get(db, key)
        past: int | None = None  # offences before this ban, looked up at most once
        duration: float | None
        if isinstance(request.duration, str):
            if request.duration != POLICY or policy is None:
                raise ValueError(f"ban duration {request.duration!r} needs POLICY and a policy")
            past = self._past_offences(db, key)
            earlier = past if old is None or old.active(now) else max(past, old.offences)
            duration = policy(earlier)
        else:
            duration = request.duration
        if duration is not None and not duration > 0:
            raise ValueError(f"ban duration must be positive seconds or None (forever), not {duration!r}")
        new_expires = None if duration is None else now + duration
        if old is not None and old.active(now):
            expires = None if old.expires is None or new_expires is None else max(old.expires, new_expires)
            ban = Ban(
                address=addr,
                reason=request.reason,
                mode=request.mode,
                port=request.port,
                first_seen=old.first_seen,
                last_seen=now,
                count=old.count + 1,
                expires=expires,
                offences=old.offences,
                hosts_deny_line=request.hosts_deny_line if request.hosts_deny_line is not None
                else old.hosts_deny_line,
                backends=tuple(dict.fromkeys((*old.backends, *request.backends))),
                # The longer ban holds, and with it who made it.
                origin=origin if expires != old.expires else old.origin,
            )
            kind: EventKind = "extend"
        else:
            if old is not None:
                self._retire(db, old, now, "expire", "expired before the next ban")
            ban = Ban(
                address=addr,
                reason=request.reason,
                mode=request.mode,
                port=request.port,
                first_seen=now,
                last_seen=now,
                count=1,
                expires=new_expires,
                offences=(past if past is not None and old is None else self._past_offences(db, key)) + 1,
                hosts_deny_line=request.hosts_deny_line,
                backends=tuple(dict.fromkeys(request.backends)),
                origin=origin,
            )
            kind = "ban"
        db.execute(
            f"INSERT OR REPLACE INTO bans ({_BAN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, ban.reason, ban.mode, ban.port, ban.first_seen, ban.last_seen, ban.count, ban.expires,
             ban.offences, ban.hosts_deny_line, json.dumps(list(ban.backends)), ban.origin),
        )
        detail = f"{ban.mode} port {ban.port}: {ban.reason}; {_describe_expiry(ban.expires)}"
        if kind == "ban":
            detail += f"; offence {ban.offences}"
        self._record(db, kind, key, detail, now, origin=origin, expires=ban.expires)
        return ban

    @_store_errors
    def lift(self, address: IPAddress | str, now: float, reason: str,
             origin: str = ORIGIN_LOCAL, expired_only: bool = False) -> Ban | None:
        """End the ban of `address` (kept as an offence); the lifted ban, or None if there was none.

        Recorded as "expire" when the ban had run out by `now`, else as "lift". With
        `expired_only`, a ban still in force at `now` stays (made again or extended since the
        caller saw it expired).
        """
        with self._transaction() as db:
            key = normalise(address)
            if origin not in (ORIGIN_LOCAL, ORIGIN_LOCAL_ONLY):
                # The peer lifted its ban: a ban it sends from now on is a new one.
                db.execute("DELETE FROM lifted_here WHERE address = ? AND origin = ?", (str(key), origin))
            old = self._lift(db, key, now, reason, origin, expired_only)
            if old is not None and origin == ORIGIN_LOCAL_ONLY:
                self._lifted_here(db, [(str(key), old.origin, old.expires)], now)
            return old

    @_store_errors
    def lift_many(self, addresses: Iterable[IPAddress], now: float, reason: str,
                  origin: str = ORIGIN_LOCAL) -> int:
        """`lift` for many addresses in one transaction; how many had a ban. Rows are read and
        written in chunks, as text: parsing 100,000 addresses back costs more than the SQL."""
        keys = list(dict.fromkeys(str(normalise(a)) for a in addresses))
        lifted = 0
        with self._transaction() as db:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT address, offences, expires, origin FROM bans WHERE address IN ({marks})",
                    chunk).fetchall()
                if origin == ORIGIN_LOCAL_ONLY:
                    self._lifted_here(db, [(key, was, expires) for key, _o, expires, was in rows], now)
                db.executemany("DELETE FROM bans WHERE address = ?", ((key,) for key, _o, _e, _w in rows))
                db.executemany(
                    "INSERT INTO offenders (address, offences, last_lifted) VALUES (?, ?, ?) "
                    "ON CONFLICT (address) DO UPDATE SET "
                    "offences = max(offences, excluded.offences), last_lifted = excluded.last_lifted",
                    ((key, offences, now) for key, offences, _e, _w in rows))
                db.executemany(_HISTORY_INSERT, (
                    (now, "lift" if expires is None or expires > now else "expire", key, reason, origin, None,
                     self._reported) for key, _o, expires, _w in rows))
                lifted += len(rows)
        return lifted

    @staticmethod
    def _lifted_here(db: sqlite3.Connection, rows: Iterable[tuple[str, str, float | None]],
                     now: float) -> None:
        """Remember the fleet bans among `rows` (address, origin, expiry) that an admin lifted here
        only: a peer sends its active bans again after Redis lost data, and those must not come
        back (fleet.apply asks `lifted_here`). This host's own bans are not remembered: peers'
        copies of them are echoes, never applied here."""
        db.executemany(
            "INSERT INTO lifted_here (address, origin, expires, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET origin = excluded.origin, expires = excluded.expires, "
            "at = excluded.at",
            ((key, origin, expires, now) for key, origin, expires in rows
             if origin not in (ORIGIN_LOCAL, ORIGIN_LOCAL_ONLY)))

    def lifted_here(self, addresses: Iterable[IPAddress]) -> dict[IPAddress, tuple[str, float | None]]:
        """For those of `addresses` whose fleet ban an admin lifted here only: (origin, expiry)."""
        found: dict[IPAddress, tuple[str, float | None]] = {}
        with self._lock:
            # Nearly always empty: a joining host's 100,000 bans then cost one query, not 100,000.
            if self._db.execute("SELECT 1 FROM lifted_here LIMIT 1").fetchone() is None:
                return found
            keys = list(dict.fromkeys(str(normalise(a)) for a in addresses))
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT address, origin, expires FROM lifted_here WHERE address IN ({marks})"
                for address, origin, expires in self._db.execute(query, chunk):
                    found[ip_address(address)] = (origin, expires)
        return found

    def _lift(self, db: sqlite3.Connection, address: IPAddress, now: float, reason: str,
              origin: str, expired_only: bool = False) -> Ban | None:
        old = self._get(db, str(address))
        if old is None or (expired_only and old.active(now)):
            return None
        self._retire(db, old, now, "lift" if old.active(now) else "expire", reason, origin)
        return old

    # -- the change feed ---------------------------------------------------------------------

    @_store_errors
    def changes(self, after: int, limit: int = 10_000) -> list[Change]:
        """Changes with an id above `after`, oldest first, at most `limit` of them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, at, kind, address, expires, origin, detail FROM history "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            ).fetchall()
        return [Change(id=r[0], at=r[1], kind=r[2], address=ip_address(r[3]), expires=r[4], origin=r[5],
                       detail=r[6]) for r in rows]

    @_store_errors
    def claim_unreported(self, limit: int = 10_000) -> list[Change]:
        """Changes nobody has reported yet (made with `reports=False`), oldest first, at most
        `limit`; marked reported in the same transaction, so each is handed out once, whichever
        daemon (one per mode, as 1.2 ran) asks and however often it restarts."""
        with self._lock:
            # Nearly always none: a look without the write lock, which a round takes every second.
            if self._db.execute("SELECT 1 FROM history WHERE reported = 0 LIMIT 1").fetchone() is None:
                return []
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, at, kind, address, expires, origin, detail FROM history "
                "WHERE reported = 0 ORDER BY id LIMIT ?", (limit,)).fetchall()
            db.executemany("UPDATE history SET reported = 1 WHERE id = ?", ((r[0],) for r in rows))
        return [Change(id=r[0], at=r[1], kind=r[2], address=ip_address(r[3]), expires=r[4], origin=r[5],
                       detail=r[6]) for r in rows]

    @_store_errors
    def last_change(self) -> int:
        """The id of the newest change (0: none yet); a consumer starting from the current state
        reads the active bans and then follows the feed from here."""
        with self._lock:
            row = self._db.execute("SELECT max(id) FROM history").fetchone()
        return int(row[0] or 0)

    @_store_errors
    def fingerprint(self) -> str:
        """Which file this is and how far it got: when it was made (schema version 1), its newest
        change and its rows of bans. Equal at a stop and at the next start: nothing was banned
        or lifted in between, and the file was neither replaced nor restored from a backup."""
        with self._lock:
            made = self._db.execute("SELECT applied_at FROM schema_migrations WHERE version = 1").fetchone()
            change = self._db.execute("SELECT max(id) FROM history").fetchone()[0]
            rows = self._db.execute("SELECT count(*) FROM bans").fetchone()[0]
        return f"{made[0] if made else None!r} {change or 0} {rows}"

    @_store_errors
    def active_count(self, now: float) -> int:
        with self._lock:
            row = self._db.execute(f"SELECT count(*) FROM bans WHERE {_ACTIVE}", (now,)).fetchone()
        return int(row[0])

    @_store_errors
    def prune(self, now: float, retention: float = DEFAULT_RETENTION,
              max_rows: int = DEFAULT_MAX_ROWS) -> int:
        """Forget history older than `retention` seconds or beyond the newest `max_rows`, and
        offenders whose last ban ended more than `retention` ago (escalation starts afresh).
        Returns the history rows removed. A feed consumer whose cursor falls behind what is
        kept re-reads the active bans."""
        oldest = now - retention if retention > 0 else float("-inf")  # 0: no age limit
        with self._transaction() as db:
            newest = int(db.execute("SELECT coalesce(max(id), 0) FROM history").fetchone()[0])
            below = newest - max_rows if max_rows > 0 else 0  # 0: no count limit
            removed = db.execute("DELETE FROM history WHERE at < ? OR id <= ?", (oldest, below)).rowcount
            db.execute("DELETE FROM offenders WHERE last_lifted < ? AND address NOT IN "
                       "(SELECT address FROM bans)", (oldest,))
            # Hit aggregates and refusals age the same way; the oldest hours go past max_rows.
            first_hour = int(oldest // 3600) if oldest != float("-inf") else -1
            db.execute("DELETE FROM hits WHERE hour < ?", (first_hour,))
            db.execute("DELETE FROM refusals WHERE hour < ?", (first_hour,))
            db.execute("DELETE FROM names WHERE at < ?", (oldest,))
            # A ban sent again after its expiry is not made anyway; a ban for ever waits for its lift.
            db.execute("DELETE FROM lifted_here WHERE expires < ?", (now,))
            if max_rows > 0:
                excess = int(db.execute("SELECT count(*) FROM hits").fetchone()[0]) - max_rows
                if excess > 0:
                    db.execute("DELETE FROM hits WHERE rowid IN "
                               "(SELECT rowid FROM hits ORDER BY hour LIMIT ?)", (excess,))
        return int(removed)

    @_store_errors
    def add_hits(self, rows: Iterable[HitRow], refused: Iterable[tuple[int, str, int]],
                 names: Iterable[tuple[str, str, float]] = ()) -> None:
        """Merge a batch of hit aggregates, guard refusals and (address, name, when) reverse-DNS
        names (journal.hits) in one transaction; the latest name of an address holds."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO names (address, name, at) VALUES (?, ?, ?) ON CONFLICT (address) DO UPDATE "
                "SET name = excluded.name, at = excluded.at WHERE excluded.at >= at", names)
            db.executemany(
                "INSERT INTO hits (source, port, mode, hour, kind, count, below, first, last) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source, port, mode, hour, kind) DO UPDATE "
                "SET count = count + excluded.count, below = below + excluded.below, "
                "first = min(first, excluded.first), last = max(last, excluded.last)",
                ((r.source, r.port, r.mode, r.hour, r.kind, r.count, r.below, r.first, r.last) for r in rows))
            db.executemany(
                "INSERT INTO refusals (hour, reason, count) VALUES (?, ?, ?) "
                "ON CONFLICT (hour, reason) DO UPDATE SET count = count + excluded.count", refused)

    @_store_errors
    def get(self, address: IPAddress | str) -> Ban | None:
        """The ban of `address` still in the table (it may have expired), or None."""
        key = str(normalise(address))
        with self._lock:
            return self._get(self._db, key)

    @_store_errors
    def active(self, now: float) -> list[Ban]:
        """Bans in force at `now`, oldest first."""
        return self._select(f"WHERE {_ACTIVE} ORDER BY first_seen, address", (now,))

    @_store_errors
    def active_routed(self, now: float) -> list[tuple[IPAddress, int, str]]:
        """(address, port, mode) of every ban in force that KILL_ROUTE ran for (ROUTE_MARK)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT address, port, mode FROM bans WHERE {_ACTIVE} AND EXISTS "
                "(SELECT 1 FROM json_each(bans.backends) WHERE value = ?)", (now, ROUTE_MARK)
            ).fetchall()
        return [(stored_address(a), port, mode) for a, port, mode in rows]

    @_store_errors
    def active_packed(self, now: float) -> list[tuple[bytes, float | None]]:
        """(packed address, expires) of every ban in force: what the kernel sets and the engine
        need at start, without an address object per row (a million bans)."""
        with self._lock:
            rows = self._db.execute(f"SELECT address, expires FROM bans WHERE {_ACTIVE}", (now,)).fetchall()
        pton, v4, v6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6
        return [(pton(v6 if ":" in a else v4, a), e) for a, e in rows]

    @_store_errors
    def active_lines(self, now: float) -> list[tuple[IPAddress, str]]:
        """(address, hosts.deny line) of every ban in force that has a line."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT address, hosts_deny_line FROM bans WHERE hosts_deny_line IS NOT NULL AND {_ACTIVE}",
                (now,)).fetchall()
        return [(stored_address(a), line) for a, line in rows]

    @_store_errors
    def expired(self, now: float) -> list[Ban]:
        """Bans past their expiry at `now` that nobody has lifted yet, earliest expiry first."""
        return self._select("WHERE expires IS NOT NULL AND expires <= ? ORDER BY expires, address", (now,))

    @_store_errors
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

    # -- history -----------------------------------------------------------------------------

    @_store_errors
    def history(self, limit: int = 100) -> list[Event]:
        """The last `limit` events, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT at, kind, address, detail FROM "
                "(SELECT id, at, kind, address, detail FROM history ORDER BY id DESC LIMIT ?) "
                "ORDER BY id",
                (limit,),
            ).fetchall()
        return [Event(at=r[0], kind=r[1], address=ip_address(r[2]), detail=r[3]) for r in rows]

    @_store_errors
    def unmark_routed(self, addresses: Iterable[IPAddress]) -> None:
        """KILL_ROUTE failed for these bans, and no earlier KILL_ROUTE holds them: ROUTE_MARK is
        dropped (it was recorded before the command ran), so nothing lists the ban as held by it,
        and neither KILL_ROUTE_UNDO nor the re-run after a reboot is done for a route that was
        never made (or that someone else, such as 1.2, made: its "File exists")."""
        with self._transaction() as db:
            for address in addresses:
                key = str(normalise(address))
                ban = self._get(db, key)
                if ban is not None and ROUTE_MARK in ban.backends:
                    kept = [name for name in ban.backends if name != ROUTE_MARK]
                    db.execute("UPDATE bans SET backends = ? WHERE address = ?", (json.dumps(kept), key))

    @_store_errors
    def record(self, kind: EventKind, address: IPAddress | str, detail: str, now: float) -> None:
        """Add an event to the history (ban/lift already record their own)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"history event kind must be one of {', '.join(EVENT_KINDS)}, not {kind!r}")
        key = str(normalise(address))
        with self._transaction() as db:
            self._record(db, kind, key, detail, now)

    # -- hosts.deny lines --------------------------------------------------------------------

    @_store_errors
    def own_line(self, address: IPAddress | str, line: str, now: float) -> None:
        """We are about to append `line` to hosts.deny for `address`: from now on that copy is ours.

        Called under the hosts.deny lock after the file was found not to hold the line, and
        before the append, so a crash between the two leaves a record of a line that is not
        there (restore appends it), never a line of ours nobody knows of. A line that was
        already in the file is someone else's and is never recorded.
        """
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO written_lines (line, address, written_at) VALUES (?, ?, ?)",
                (line, str(normalise(address)), now),
            )

    @_store_errors
    def own_lines(self, owned: Iterable[tuple[IPAddress, str]], now: float) -> None:
        """`own_line` for many (address, line) pairs in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO written_lines (line, address, written_at) VALUES (?, ?, ?)",
                ((line, str(normalise(address)), now) for address, line in owned),
            )

    @_store_errors
    def owns_line(self, address: IPAddress | str, line: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM written_lines WHERE line = ? AND address = ?",
                                   (line, str(normalise(address)))).fetchone()
        return row is not None

    @_store_errors
    def owned_of(self, addresses: Iterable[IPAddress]) -> list[tuple[IPAddress, str]]:
        """(address, line) for the hosts.deny copies we appended for any of `addresses`."""
        keys = [str(normalise(a)) for a in addresses]
        found: list[tuple[IPAddress, str]] = []
        with self._lock:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found += [(ip_address(address), line) for address, line in self._db.execute(
                    f"SELECT address, line FROM written_lines WHERE address IN ({marks})", chunk)]
        return found

    @_store_errors
    def disown_lines(self, owned: Iterable[tuple[IPAddress, str]]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM written_lines WHERE line = ? AND address = ?",
                           ((line, str(normalise(address))) for address, line in owned))

    @_store_errors
    def disown_line(self, address: IPAddress | str, line: str) -> None:
        """Our copy of `line` was removed from hosts.deny."""
        with self._transaction() as db:
            db.execute("DELETE FROM written_lines WHERE line = ? AND address = ?",
                       (line, str(normalise(address))))

    @_store_errors
    def owned_lines(self, now: float) -> tuple[dict[str, int], dict[str, int]]:
        """The hosts.deny lines we appended and have not removed yet, as copies per line text:
        (those whose address is banned at `now`, those whose ban is over)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT w.line, EXISTS (SELECT 1 FROM bans b WHERE b.address = w.address "
                f"AND {_ACTIVE}) FROM written_lines w",
                (now,),
            ).fetchall()
        active: dict[str, int] = {}
        stale: dict[str, int] = {}
        for line, is_active in rows:
            counts = active if is_active else stale
            counts[line] = counts.get(line, 0) + 1
        return active, stale

    @_store_errors
    def stale_lines(self, now: float) -> set[str]:
        """hosts.deny lines of ours whose ban is over (lifting failed to remove them)."""
        return set(self.owned_lines(now)[1])

    @_store_errors
    def forget_lines(self, lines: Iterable[str], now: float) -> None:
        """Stop tracking our copies of `lines` (tidy removed them), except for addresses banned
        again meanwhile."""
        with self._transaction() as db:
            for line in lines:
                db.execute(
                    "DELETE FROM written_lines WHERE line = ? AND address NOT IN "
                    f"(SELECT address FROM bans WHERE {_ACTIVE})",
                    (line, now),
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @_store_errors
    def close_held(self, now: float) -> tuple[list[Ban], list[tuple[IPAddress, str, float]]]:
        """The bans in force at `now` and the hosts.deny lines that are ours (address, line,
        written at), then closed in the same hold of the lock: an in-memory stand-in handing
        over to the disk, whose late writes must fail (their callers keep and retry them)
        rather than land after the read and be lost with it."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_BAN_COLUMNS} FROM bans WHERE {_ACTIVE} "
                                    "ORDER BY first_seen, address", (now,)).fetchall()
            lines = self._db.execute("SELECT address, line, written_at FROM written_lines "
                                     "ORDER BY written_at").fetchall()
            self._db.close()
        return [_ban_from_row(r) for r in rows], [(ip_address(a), line, at) for a, line, at in lines]

    def __enter__(self) -> BanStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _select(self, where: str, params: tuple[object, ...]) -> list[Ban]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_BAN_COLUMNS} FROM bans {where}", params).fetchall()
        return [_ban_from_row(r) for r in rows]

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> Ban | None:
        row = db.execute(f"SELECT {_BAN_COLUMNS} FROM bans WHERE address = ?", (key,)).fetchone()
        return None if row is None else _ban_from_row(row)

    @staticmethod
    def _past_offences(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT offences FROM offenders WHERE address = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _retire(self, db: sqlite3.Connection, old: Ban, now: float, kind: EventKind, reason: str,
                origin: str = ORIGIN_LOCAL) -> None:
        key = str(old.address)
        db.execute("DELETE FROM bans WHERE address = ?", (key,))
        db.execute(
            "INSERT INTO offenders (address, offences, last_lifted) VALUES (?, ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET "
            "offences = max(offences, excluded.offences), last_lifted = excluded.last_lifted",
            (key, old.offences, now),
        )
        self._record(db, kind, key, reason, now, origin=origin)

    def _record(self, db: sqlite3.Connection, kind: EventKind, key: str, detail: str, now: float, *,
                origin: str = ORIGIN_LOCAL, expires: float | None = None) -> None:
        db.execute(_HISTORY_INSERT, (now, kind, key, detail, origin, expires, self._reported))


def _holds(expires: float | None, duration: float | str | None, now: float) -> bool:
    """Whether a ban until `expires` is in force at `now` and lasts at least `duration` more."""
    if expires is not None and expires <= now:
        return False
    if expires is None or duration is None:
        return expires is None
    return isinstance(duration, float | int) and expires >= now + duration


@functools.lru_cache(maxsize=64)
def _backends(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def _ban_from_row(row: tuple[object, ...]) -> Ban:
    (address, reason, mode, port, first_seen, last_seen, count, expires, offences, line, backends,
     origin) = row
    return Ban(
        address=stored_address(cast(str, address)),
        reason=cast(str, reason),
        mode=cast(str, mode),
        port=cast(int, port),
        first_seen=cast(float, first_seen),
        last_seen=cast(float, last_seen),
        count=cast(int, count),
        expires=cast("float | None", expires),
        offences=cast(int, offences),
        hosts_deny_line=cast("str | None", line),
        backends=_backends(cast(str, backends)),
        origin=cast(str, origin),
    )
