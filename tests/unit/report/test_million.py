"""A generated history of a million hits (the bench's worst shape: every hit its own aggregate row)
gives exact counts in all four formats. The expected numbers come from the generator's formula,
not from the report code."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path

from portsentry.bans.store import BanStore
from portsentry.journal.hits import HitRow
from portsentry.report.data import build, open_read_only
from portsentry.report.render import as_csv, as_html, as_json, text

NOW = 1_800_000_000.0
HOUR = int(NOW // 3600)
HITS = 1_000_000
SOURCES = 1 << 17  # source i % 2**17: 198.18.0.0 - 198.19.255.255
PORTS = 1024


def source(i: int) -> str:
    return f"198.{18 + (i >> 16) % 2}.{(i >> 8) & 255}.{i & 255}"


def test_a_million_hits_are_counted_exactly_in_every_format(tmp_path: Path) -> None:
    path = tmp_path / "bans.sqlite3"
    store = BanStore(str(path))
    # Hit i: source i % 2**17, port 1 + i % 1024, i % 24 hours ago, i % 3 + 1 hits of which
    # (i % 3 == 0) below the trigger.
    hits = (HitRow(source(i), 1 + i % PORTS, "atcp", HOUR - i % 24, "TCP SYN/Normal scan", i % 3 + 1,
                   int(i % 3 == 0), NOW - 3600 * (i % 24), NOW - 3600 * (i % 24)) for i in range(HITS))
    store.add_hits(hits, [(HOUR, "it is a default gateway", 7)], [(source(5), "five.example", NOW)])
    store.close()
    expected_hits = sum(i % 3 + 1 for i in range(HITS))
    per_port: Counter[int] = Counter()
    per_source: Counter[int] = Counter()
    for i in range(HITS):
        per_port[1 + i % PORTS] += i % 3 + 1
        per_source[i % SOURCES] += i % 3 + 1
    top_port, top_port_hits = min(per_port.items(), key=lambda item: (-item[1], item[0]))
    busiest = min(per_source.items(), key=lambda item: (-item[1], source(item[0])))

    db = open_read_only(str(path))
    try:
        report = build(db, NOW - 86400, NOW)
    finally:
        db.close()

    data = json.loads(as_json(report))
    assert data["totals"] == {"hits": expected_hits, "scanners": SOURCES, "bans": 0, "refused": 7,
                              "near_misses": 0}
    assert data["top_ports"][0] == {"port": top_port, "hits": top_port_hits}
    assert sum(p["hits"] for p in data["timeline"]["points"]) == expected_hits
    assert data["scanners"][0]["address"] == source(busiest[0]) and data["scanners"][0]["hits"] == busiest[1]
    assert sum(s["hits"] for s in data["scanners"]) == expected_hits
    assert next(s for s in data["scanners"] if s["address"] == source(5))["name"] == "five.example"
    # Every /24 holds 256 sources; the busiest network's hits are its sources' sum.
    network = data["top_networks"][0]
    prefix = network["network"].rsplit(".", 1)[0] + "."
    assert network["scanners"] == 256
    assert network["hits"] == sum(h for i, h in per_source.items() if source(i).startswith(prefix))

    rows = list(csv.DictReader(io.StringIO(as_csv(report), newline="")))
    assert len(rows) == SOURCES and sum(int(row["hits"]) for row in rows) == expected_hits
    assert [row["address"] for row in rows[:50]] == [s["address"] for s in data["scanners"][:50]]

    page = as_html(report)
    assert re.search(rf'data-key="hits">{expected_hits}</b>', page)
    assert re.search(rf'data-key="scanners">{SOURCES}</b>', page)
    summary = text(report).splitlines()[1]
    assert summary.startswith(f"{expected_hits} hits from {SOURCES} scanners, 0 bans, 7 blocks refused")
