"""What `portsentry report` says, computed from the ban store alone: the hit aggregates (per
source, port, mode, scan type and hour), the guards' refusals, the bans table and the history.

It only reads: the store is opened read-only (SQLite `mode=ro`), so a report works with the
daemon running or stopped and never changes anything. The numbers are computed once, here, into
a `Report`; every format (text, HTML, JSON, CSV) renders that same object, so they agree.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "portsentry-report/1"
TOP = 10
EVIDENCE_CONNECTION = "connection"  # a completed TCP connection (connect modes): cannot be forged
EVIDENCE_PACKETS = "packets"  # single packets (stealth modes): a source address can be forged

Window = tuple[int, int, float, float]  # the report's first and last hour, since, until


def ranges(ports: list[int]) -> str:
    """Sorted, distinct ports as core.ports.format_ports writes them ("1-3,79"), without sorting
    them again: a report formats a hundred thousand of these (a test holds the two equal)."""
    if len(ports) == 1:  # most scanners of a busy host try one port or one run of them
        return str(ports[0])
    if ports and ports[-1] - ports[0] == len(ports) - 1:
        return f"{ports[0]}-{ports[-1]}"
    parts: list[str] = []
    start = previous = -2
    for port in ports:
        if port != previous + 1:
            if previous >= 0:
                parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = port
        previous = port
    if previous >= 0:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)


class ReportError(Exception):
    """The store cannot be read; the text names it."""


@dataclass(slots=True)
class Scanner:
    address: str
    first_seen: float
    last_seen: float
    hits: int
    below_trigger: int
    ports: list[int]
    scan_types: list[str]
    evidence: str
    banned: bool = False
    ban_expires: float | None = None
    offences: int = 0
    origin: str | None = None
    name: str | None = None  # reverse DNS, when RESOLVE_HOST found one

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "hits": self.hits,
            "below_trigger": self.below_trigger,
            "ports": ranges(self.ports),
            "port_count": len(self.ports),
            "scan_types": self.scan_types,
            "evidence": self.evidence,
            "banned": self.banned,
            "ban_expires": self.ban_expires,
            "offences": self.offences,
            "origin": self.origin,
            "name": self.name,
        }


@dataclass
class Report:
    since: float
    until: float
    bucket: str  # "hour" or "day"
    scanners: list[Scanner] = field(default_factory=list)
    top_ports: list[tuple[int, int]] = field(default_factory=list)
    top_scan_types: list[tuple[str, int]] = field(default_factory=list)
    top_networks: list[tuple[str, int, int]] = field(default_factory=list)  # network, hits, scanners
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # bucket start, hits, bans
    near_misses: list[tuple[str, int]] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)
    bans: int = 0

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.scanners)

    def to_json(self, scanners: bool = True) -> dict[str, Any]:
        """The report as docs/report.schema.json describes it; without `scanners`, all but that
        list (render.as_json writes it faster itself)."""
        data = {
            "schema": SCHEMA,
            "since": self.since,
            "until": self.until,
            "totals": {
                "hits": self.hits,
                "scanners": len(self.scanners),
                "bans": self.bans,
                "refused": sum(count for _, count in self.refused),
                "near_misses": len(self.near_misses),
            },
            "scanners": [s.to_json() for s in self.scanners] if scanners else [],
            "top_ports": [{"port": port, "hits": hits} for port, hits in self.top_ports],
            "top_scan_types": [{"scan_type": kind, "hits": hits} for kind, hits in self.top_scan_types],
            "top_networks": [
                {"network": net, "hits": hits, "scanners": n} for net, hits, n in self.top_networks
            ],
            "timeline": {
                "bucket": self.bucket,
                "points": [
                    {"start": start, "hits": hits, "bans": bans} for start, hits, bans in self.timeline
                ],
            },
            "near_misses": [{"address": a, "hits": hits} for a, hits in self.near_misses],
            "refused": [{"reason": reason, "count": count} for reason, count in self.refused],
        }
        if not scanners:
            del data["scanners"]
        return data


def open_read_only(path: str) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        db.execute("SELECT count(*) FROM hits").fetchone()
    except (sqlite3.Error, UnicodeDecodeError) as error:  # the second: a damaged schema text
        # The question only where there is no store: of a damaged one it sent the admin looking
        # for another file.
        hint = "" if os.path.exists(path) else "; has portsentry run here?"
        raise ReportError(f"{path}: cannot read the ban store ({error}){hint}") from None
    return db


def build(db: sqlite3.Connection, since: float, until: float) -> Report:
    """The report of [since, until] from one snapshot of the store, whatever the daemon writes
    meanwhile (a read transaction, ended without writing anything)."""
    try:
        db.execute("BEGIN")
        try:
            return _build(db, since, until)
        finally:
            db.rollback()
    except (sqlite3.Error, UnicodeDecodeError) as error:
        # open_read_only's query reads one table; damage elsewhere in the file shows only
        # here (a text of bytes that are not UTF-8 as well: SQLite does not check them).
        path = _path_of_quietly(db)
        raise ReportError(f"{path}: cannot read the ban store ({error})") from None


def _build(db: sqlite3.Connection, since: float, until: float) -> Report:
    bucket = "hour" if until - since <= 3 * 86400 else "day"
    report = Report(since, until, bucket)
    # The hour picks the rows (and the index); a row's first and last time leave out the rows
    # wholly outside [since, until] in the hours at its ends. A row across `since` counts whole.
    window = (int(since // 3600), int(until // 3600), since, until)
    # Two passes over the hits, both in SQLite: per source, and per (port, scan type, hour), which
    # is small whatever the traffic; a million hit rows never become a million Python tuples.
    # Scan types may hold commas, so they are joined with a unit separator.
    column = _hour_column(db, window)
    with ThreadPoolExecutor(1, thread_name_prefix="report") as pool:
        # The second pass on a connection of its own, at the same time: SQLite lets go of the
        # GIL while it steps, so the two take about one pass's time on two cores.
        path = _path_of(db)
        second = pool.submit(_tally_in, path, column, window) if path else None
        rows = db.execute(
            "SELECT source, min(first), max(last), sum(count), sum(below), max(kind = 'Connect'), "
            # DISTINCT in SQLite is nearly free, and leaves most scanners one port and one kind;
            # a kind is written with its commas as unit separators, since DISTINCT takes no separator.
            "group_concat(DISTINCT port), group_concat(DISTINCT replace(kind, ',', char(31))) "
            f"FROM hits WHERE {column} BETWEEN ? AND ? AND last >= ? AND first <= ? "
            "GROUP BY source ORDER BY 4 DESC, 1",  # the report's order: most hits first
            window,
        ).fetchall()
        tally = second.result() if second is not None else None
    if tally is None or tally.total != sum(row[3] for row in rows):
        # Its snapshot missed (or saw) a write this one did not: count again in this one.
        tally = _tally(db, column, window)
    report.scanners = _scanners(db, rows, until)
    port_hits, kind_hits, hour_hits = tally.ports, tally.kinds, tally.hours
    report.top_ports = sorted(port_hits.items(), key=lambda item: (-item[1], item[0]))[:TOP]
    report.top_scan_types = sorted(kind_hits.items(), key=lambda item: (-item[1], item[0]))[:TOP]
    report.top_networks = _networks(report.scanners)
    report.near_misses = [
        (s.address, s.hits)
        for s in report.scanners
        if s.below_trigger == s.hits and not s.banned and s.origin is None
    ]
    report.refused = [
        (reason, int(count))
        for reason, count in db.execute(
            "SELECT reason, sum(count) FROM refusals WHERE hour BETWEEN ? AND ? GROUP BY reason "
            "ORDER BY 2 DESC, 1",
            window[:2],
        )
    ]
    ban_times = [
        at
        for (at,) in db.execute(
            "SELECT at FROM history WHERE kind = 'ban' AND at BETWEEN ? AND ?", (since, until)
        )
    ]
    report.bans = len(ban_times)
    report.timeline = _timeline(report, hour_hits, ban_times)
    return report


@dataclass
class _Tally:
    ports: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    hours: Counter[int] = field(default_factory=Counter)
    total: int = 0


def _tally(db: sqlite3.Connection, column: str, window: Window) -> _Tally:
    tally = _Tally()
    for port, kind, hour, count in db.execute(
        f"SELECT port, kind, hour, sum(count) FROM hits WHERE {column} BETWEEN ? AND ? "
        "AND last >= ? AND first <= ? GROUP BY port, kind, hour",
        window,
    ):
        tally.ports[port] += count
        tally.kinds[kind] += count
        tally.hours[hour] += count
        tally.total += count
    return tally


def _tally_in(path: str, column: str, window: Window) -> _Tally:
    db = open_read_only(path)
    try:
        return _tally(db, column, window)
    finally:
        db.close()


def _kinds(text: str) -> list[str]:
    """The distinct scan types of group_concat(DISTINCT replace(kind, ',', char(31))), sorted."""
    if "," not in text:
        return [text.replace("\x1f", ",")] if "\x1f" in text else [text]
    return sorted(kind.replace("\x1f", ",") for kind in text.split(","))


def _path_of_quietly(db: sqlite3.Connection) -> str:
    try:
        return _path_of(db) or "the ban store"
    except sqlite3.Error:
        return "the ban store"


def _path_of(db: sqlite3.Connection) -> str:
    """The file of the main database ("" in memory: nothing to open twice)."""
    return str(db.execute("PRAGMA database_list").fetchone()[2] or "")


def _scanners(db: sqlite3.Connection, rows: list[Any], until: float) -> list[Scanner]:
    scanners: list[Scanner] = []
    bans = {
        address: (expires, offences)
        for address, expires, offences in db.execute(
            "SELECT address, expires, offences FROM bans WHERE expires IS NULL OR expires > ?", (until,)
        )
    }
    origins = dict(
        db.execute(
            "SELECT address, origin FROM history WHERE kind = 'ban' AND at <= ? ORDER BY id", (until,)
        ).fetchall()
    )
    names = dict(db.execute("SELECT address, name FROM names").fetchall()) if _has_names(db) else {}
    for source, first, last, hits, below, connected, port_text, kind_text in rows:
        scanner = Scanner(
            source,
            first,
            last,
            hits,
            below,
            [int(port_text)] if port_text.isdigit() else sorted(map(int, port_text.split(","))),
            _kinds(kind_text),
            EVIDENCE_CONNECTION if connected else EVIDENCE_PACKETS,
        )
        if source in bans:
            scanner.banned = True
            scanner.ban_expires, scanner.offences = bans[source]
        scanner.origin = origins.get(source)
        scanner.name = names.get(source)
        scanners.append(scanner)
    return scanners


def _has_names(db: sqlite3.Connection) -> bool:
    """A store written before schema 5 has no names table (the report only reads: it never
    migrates), and its scanners have no name."""
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'names'").fetchone()
    return found is not None


def _hour_column(db: sqlite3.Connection, window: Window) -> str:
    """`hour`, or `+hour` (which keeps SQLite off the hour index) when the window covers much of
    what is stored: walking the index and then sorting a million rows by source took twice as
    long as reading the table through (bench part `report`)."""
    low, high = db.execute("SELECT min(hour), max(hour) FROM hits").fetchone()
    if low is None:
        return "hour"
    covered = min(high, window[1]) - max(low, window[0]) + 1
    return "+hour" if covered > 0.2 * (high - low + 1) else "hour"


def _network_of(address: str) -> str:
    """The /24 or /64 an address (as the store writes it) is in, without an address object each:
    a report can hold a hundred thousand scanners."""
    if ":" not in address:
        return address.rsplit(".", 1)[0] + ".0/24"
    packed = socket.inet_pton(socket.AF_INET6, address)[:8] + bytes(8)
    return f"{socket.inet_ntop(socket.AF_INET6, packed)}/64"


def _networks(scanners: list[Scanner]) -> list[tuple[str, int, int]]:
    hits: Counter[str] = Counter()
    members: Counter[str] = Counter()
    for scanner in scanners:
        network = _network_of(scanner.address)
        hits[network] += scanner.hits
        members[network] += 1
    ranked = sorted(hits.items(), key=lambda item: (-item[1], item[0]))[:TOP]
    return [(network, count, members[network]) for network, count in ranked]


def _timeline(
    report: Report, hour_hits: Counter[int], ban_times: list[float]
) -> list[tuple[float, int, int]]:
    size = 3600 if report.bucket == "hour" else 86400
    start = int(report.since // size) * size
    count = int((report.until - start) // size) + 1
    hits = [0] * count
    bans = [0] * count
    for hour, total in hour_hits.items():
        index = int((hour * 3600 - start) // size)
        if 0 <= index < count:
            hits[index] += total
    for at in ban_times:
        index = int((at - start) // size)
        if 0 <= index < count:
            bans[index] += 1
    return [(float(start + i * size), hits[i], bans[i]) for i in range(count)]
