"""What every part of the ban store shares: the one SQLite connection with its lock and its
`BEGIN IMMEDIATE` transactions, the columns of a `bans` row and how one becomes a Ban, the
history insert, and the wrapper that turns SQLite failures into StoreError.

bans.store opens the connection (BanStore.__init__); the parts of BanStore in bans.writes,
bans.feed and bans.owned_lines build on StoreConnection, so each write is still one transaction
on the one connection, taken in one place (`_transaction`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar, cast

from portsentry.bans.records import ORIGIN_LOCAL, Ban, EventKind, StoreError, stored_address

BAN_COLUMNS = (
    "address, reason, mode, port, first_seen, last_seen, count, expires, offences, hosts_deny_line, "
    "backends, origin"
)
HISTORY_INSERT = ("INSERT INTO history (at, kind, address, detail, origin, expires, reported) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)")
# A ban is active at time ? while its expiry lies after it (or it has none).
ACTIVE = "(expires IS NULL OR expires > ?)"
CHUNK = 500  # addresses per IN (...) query, below SQLite's variable limit
_T = TypeVar("_T")
_P = ParamSpec("_P")


def describe_expiry(expires: float | None) -> str:
    if expires is None:
        return "forever"
    return "until " + time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(expires))


def busy(error: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection holds the lock."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def store_errors(method: Callable[_P, _T]) -> Callable[_P, _T]:
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


class StoreConnection:
    """The connection, its lock and the reads and writes inside a transaction that the parts of
    BanStore share; BanStore.__init__ sets the four attributes."""

    path: str
    _lock: threading.Lock
    _db: sqlite3.Connection
    _reported: int  # 1: this process reports its changes (the daemon); 0: left to the daemon

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

    def _select(self, where: str, params: tuple[object, ...]) -> list[Ban]:
        with self._lock:
            rows = self._db.execute(f"SELECT {BAN_COLUMNS} FROM bans {where}", params).fetchall()
        return [ban_from_row(r) for r in rows]

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> Ban | None:
        row = db.execute(f"SELECT {BAN_COLUMNS} FROM bans WHERE address = ?", (key,)).fetchone()
        return None if row is None else ban_from_row(row)

    @staticmethod
    def _past_offences(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT offences FROM offenders WHERE address = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    def _record(self, db: sqlite3.Connection, kind: EventKind, key: str, detail: str, now: float, *,
                origin: str = ORIGIN_LOCAL, expires: float | None = None) -> None:
        db.execute(HISTORY_INSERT, (now, kind, key, detail, origin, expires, self._reported))


@functools.lru_cache(maxsize=64)
def _backends(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def ban_from_row(row: tuple[object, ...]) -> Ban:
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
