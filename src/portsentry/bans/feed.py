"""What the ban store keeps of the past, and how it ages: `history` is the event log and the
change feed (every ban, extension, lift and expiry, with a monotonic id a consumer follows with
`changes(after=id)`), the hit aggregates and guard refusals of journal.hits are merged in for
reports, and `prune` bounds all of them by age and count. Part of BanStore (bans.store), on its
one connection (bans.connection).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address

from portsentry.bans.connection import StoreConnection, store_errors
from portsentry.bans.records import (
    DEFAULT_MAX_ROWS,
    DEFAULT_RETENTION,
    EVENT_KINDS,
    Change,
    Event,
    EventKind,
    normalise,
)
from portsentry.core.probe import IPAddress
from portsentry.journal.hits import HitRow


class Feed(StoreConnection):
    """History as the change feed and event log, the report aggregates, and pruning."""

    @store_errors
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

    @store_errors
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

    @store_errors
    def last_change(self) -> int:
        """The id of the newest change (0: none yet); a consumer starting from the current state
        reads the active bans and then follows the feed from here."""
        with self._lock:
            row = self._db.execute("SELECT max(id) FROM history").fetchone()
        return int(row[0] or 0)

    @store_errors
    def fingerprint(self) -> str:
        """Which file this is and how far it got: when it was made (schema version 1), its newest
        change and its rows of bans. Equal at a stop and at the next start: nothing was banned
        or lifted in between, and the file was neither replaced nor restored from a backup."""
        with self._lock:
            made = self._db.execute("SELECT applied_at FROM schema_migrations WHERE version = 1").fetchone()
            change = self._db.execute("SELECT max(id) FROM history").fetchone()[0]
            rows = self._db.execute("SELECT count(*) FROM bans").fetchone()[0]
        return f"{made[0] if made else None!r} {change or 0} {rows}"

    @store_errors
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

    @store_errors
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

    @store_errors
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

    @store_errors
    def record(self, kind: EventKind, address: IPAddress | str, detail: str, now: float) -> None:
        """Add an event to the history (ban/lift already record their own)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"history event kind must be one of {', '.join(EVENT_KINDS)}, not {kind!r}")
        key = str(normalise(address))
        with self._transaction() as db:
            self._record(db, kind, key, detail, now)
