"""The ban store's schema: the scripts that take a file from one version to the next.

Versions live in `PRAGMA user_version`; `schema_migrations` records when each script ran. Add a
version by appending to MIGRATIONS (never edit one that has shipped); bans.store runs what a file
lacks, in one transaction, and refuses a file from a newer portsentry.
"""

from __future__ import annotations

import sqlite3
import time

# (version, description, script); each script takes the schema from version-1 to version.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "bans, offenders, history, written hosts.deny lines",
        """
        CREATE TABLE bans (
            address TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            mode TEXT NOT NULL,
            port INTEGER NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            count INTEGER NOT NULL,
            expires REAL,
            offences INTEGER NOT NULL,
            hosts_deny_line TEXT,
            backends TEXT NOT NULL
        );
        CREATE INDEX bans_expires ON bans (expires);
        CREATE TABLE offenders (
            address TEXT PRIMARY KEY,
            offences INTEGER NOT NULL,
            last_lifted REAL NOT NULL
        );
        CREATE TABLE history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            address TEXT NOT NULL,
            detail TEXT NOT NULL
        );
        CREATE TABLE written_lines (
            line TEXT NOT NULL,
            address TEXT NOT NULL,
            written_at REAL NOT NULL,
            PRIMARY KEY (line, address)
        );
        """,
    ),
    (
        2,
        "change feed: origin and expiry on every history row; indexes for pruning and bulk lifts",
        """
        ALTER TABLE history ADD COLUMN origin TEXT NOT NULL DEFAULT 'local';
        ALTER TABLE history ADD COLUMN expires REAL;
        CREATE INDEX history_at ON history (at);
        CREATE INDEX offenders_last_lifted ON offenders (last_lifted);
        CREATE INDEX written_lines_address ON written_lines (address)
        """,
    ),
    (
        3,
        "hit aggregates per source, port, mode and hour, and guard refusals per hour, for reports",
        """
        CREATE TABLE hits (
            source TEXT NOT NULL,
            port INTEGER NOT NULL,
            mode TEXT NOT NULL,
            hour INTEGER NOT NULL,
            kind TEXT NOT NULL,
            count INTEGER NOT NULL,
            below INTEGER NOT NULL,
            first REAL NOT NULL,
            last REAL NOT NULL,
            PRIMARY KEY (source, port, mode, hour, kind)
        );
        CREATE INDEX hits_hour ON hits (hour);
        CREATE TABLE refusals (
            hour INTEGER NOT NULL,
            reason TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (hour, reason)
        )
        """,
    ),
    (
        4,
        "who set each ban's expiry: this host or a fleet peer (portsentry list shows it)",
        """
        ALTER TABLE bans ADD COLUMN origin TEXT NOT NULL DEFAULT 'local'
        """,
    ),
    (
        5,
        "the reverse-DNS name of each source, as RESOLVE_HOST found it, for reports",
        """
        CREATE TABLE names (
            address TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX names_at ON names (at)
        """,
    ),
    (
        6,
        "fleet bans lifted on this host only, so the same ban sent again is not made again",
        """
        CREATE TABLE lifted_here (
            address TEXT PRIMARY KEY,
            origin TEXT NOT NULL,
            expires REAL,
            at REAL NOT NULL
        )
        """,
    ),
    (
        7,
        "bans KILL_ROUTE ran for carry the mark KILL_ROUTE; earlier local bans are taken as such",
        # Before, every lift ran KILL_ROUTE_UNDO and every local ban got KILL_ROUTE again after a
        # reboot: a local ban's route stays undone at its lift as it would have been.
        """
        UPDATE bans SET backends = json_insert(backends, '$[#]', 'KILL_ROUTE')
        WHERE origin = 'local'
          AND NOT EXISTS (SELECT 1 FROM json_each(bans.backends) WHERE value = 'KILL_ROUTE')
        """,
    ),
    (
        8,
        "changes the command line made on the store directly wait for the daemon to report them",
        # 0: written by `block --file`, or by block/unblock while the daemon was down; the daemon
        # writes its ban and unban events for these (bans.others) and sets 1. Earlier rows count
        # as reported: an upgrade must not report a year of history again.
        """
        ALTER TABLE history ADD COLUMN reported INTEGER NOT NULL DEFAULT 1;
        CREATE INDEX history_unreported ON history (id) WHERE reported = 0
        """,
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaTooNew(Exception):
    """The file was written by a newer portsentry; the text says which versions."""


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema of `db` to SCHEMA_VERSION, inside the caller's transaction."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"ban store schema version {version} is newer than this portsentry "
                           f"understands ({SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
    for number, description, script in MIGRATIONS:
        if number <= version:
            continue
        # executescript() would COMMIT first, so run the statements one by one.
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(
            "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
            (number, description, time.time()),
        )
        db.execute(f"PRAGMA user_version = {number:d}")
