"""The hit tally the report reads: aggregates per source, port, mode, kind and hour; refusals per
hour and reason; RESOLVE_HOST's names; bounded; put back after a failed write; and the store's
side of it (merge, latest name wins, pruning)."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

from portsentry.bans.store import BanStore
from portsentry.core.actions import Decision
from portsentry.core.probe import Mode, Probe
from portsentry.journal.hits import HitRow, HitTally

NOW = 1_800_000_000.0
HOUR = int(NOW // 3600)
SCANNER = ip_address("198.18.0.2")


def probe(port: int = 79, name: str | None = None, source: str = "198.18.0.2") -> Probe:
    return Probe(ip_address(source), port, Mode.STCP, "TCP SYN/Normal scan", source_name=name)


def test_hits_are_aggregated_and_ignored_sources_are_not_counted():
    tally = HitTally()
    tally.add(probe(), Decision.BELOW_TRIGGER, None, NOW)
    tally.add(probe(), Decision.BLOCK, None, NOW + 1)
    tally.add(probe(80), Decision.REFUSED, "it is a default gateway", NOW + 2)
    tally.add(probe(source="198.18.0.9"), Decision.IGNORED, None, NOW + 3)
    rows, refused = tally.drain()
    assert sorted(rows, key=lambda r: r.port) == [
        HitRow("198.18.0.2", 79, "stcp", HOUR, "TCP SYN/Normal scan", 2, 1, NOW, NOW + 1),
        HitRow("198.18.0.2", 80, "stcp", HOUR, "TCP SYN/Normal scan", 1, 0, NOW + 2, NOW + 2)]
    assert refused == [(HOUR, "it is a default gateway", 1)]
    assert tally.drain() == ([], [])


def test_the_tally_is_bounded_and_a_failed_write_is_put_back():
    tally = HitTally(capacity=2)
    for port in (1, 2, 3):
        tally.add(probe(port), Decision.BELOW_TRIGGER, None, NOW)
    assert tally.overflow == 1
    rows, refused = tally.drain()
    tally.add(probe(1), Decision.BELOW_TRIGGER, None, NOW + 5)
    tally.restore(rows, refused)
    again, _ = tally.drain()
    one = next(r for r in again if r.port == 1)
    assert (one.count, one.first) == (2, NOW) and len(again) == 2


def test_resolved_names_are_kept_latest_first_and_put_back():
    tally = HitTally()
    tally.add(probe(name="198.18.0.2"), Decision.BELOW_TRIGGER, None, NOW)  # no name: the address
    assert tally.drain_names() == []
    tally.add(probe(name="old.example"), Decision.BELOW_TRIGGER, None, NOW)
    tally.add(probe(name="scanner.example"), Decision.BLOCK, None, NOW + 1)
    names = tally.drain_names()
    assert names == [("198.18.0.2", "scanner.example", NOW + 1)]
    tally.add(probe(name="newer.example"), Decision.BLOCK, None, NOW + 2)
    tally.restore_names(names)  # the write failed; what came since is newer and stays
    assert tally.drain_names() == [("198.18.0.2", "newer.example", NOW + 2)]


def test_the_store_keeps_the_latest_name_and_prunes_it_with_the_hits(tmp_path: Path):
    store = BanStore(str(tmp_path / "bans.sqlite3"))
    store.add_hits([], [], [("198.18.0.2", "new.example", NOW)])
    store.add_hits([], [], [("198.18.0.2", "older.example", NOW - 10)])  # late: does not win
    store.add_hits([], [], [("198.18.0.3", "gone.example", NOW - 40 * 86400)])
    names = dict(store._db.execute("SELECT address, name FROM names").fetchall())
    assert names == {"198.18.0.2": "new.example", "198.18.0.3": "gone.example"}
    store.prune(NOW, retention=30 * 86400)
    assert store._db.execute("SELECT address FROM names").fetchall() == [("198.18.0.2",)]
    store.close()
