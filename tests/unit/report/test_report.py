"""`portsentry report` over a generated store: exact counts, the same numbers in text, JSON (valid
against docs/report.schema.json), CSV and HTML, and --since parsing."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.bans.store import BanStore
from portsentry.journal.hits import HitRow
from portsentry.report.data import Report, Scanner, build, open_read_only
from portsentry.report.render import as_csv, as_html, as_json, text
from portsentry.report.since import SinceError, parse_since
from tests.unit.journal.test_events import errors

SCHEMA = json.loads((Path(__file__).resolve().parents[3] / "docs" / "report.schema.json").read_text())
NOW = 1_800_000_000.0
HOUR = int(NOW // 3600)
SYN = "TCP SYN/Normal scan"


def generated(tmp_path: Path) -> Path:
    """Three scanners in two /24s, one of them by connection; a near miss; refusals; two bans."""
    path = tmp_path / "bans.sqlite3"
    store = BanStore(str(path))
    rows = [HitRow("198.18.0.2", port, "atcp", HOUR - 1, SYN, 2, 0, NOW - 3600, NOW - 3000)
            for port in range(1, 101)]
    rows += [HitRow("198.18.0.3", 79, "tcp", HOUR, "Connect", 5, 0, NOW - 100, NOW - 50),
             HitRow("198.18.1.9", 111, "sudp", HOUR, "UDP scan", 1, 1, NOW - 10, NOW - 10),
             HitRow("198.18.7.7", 1, "atcp", HOUR - 48, SYN, 9, 0, NOW - 48 * 3600, NOW - 48 * 3600)]  # old
    store.add_hits(rows, [(HOUR, "ban rate limit reached", 4), (HOUR - 1, "it is a default gateway", 2)])
    store.ban("198.18.0.2", reason=SYN, mode="atcp", port=1, now=NOW - 3000, duration=86400)
    store.ban("198.18.0.3", reason="Connect", mode="tcp", port=79, now=NOW - 50, duration=86400)
    store.add_hits([], [], [("198.18.0.3", "scanner.example", NOW - 50)])  # RESOLVE_HOST found it
    store.close()
    return path


def report_of(tmp_path: Path) -> Report:
    db = open_read_only(str(generated(tmp_path)))
    try:
        return build(db, NOW - 86400, NOW)
    finally:
        db.close()


def test_exact_counts(tmp_path: Path) -> None:
    report = report_of(tmp_path)
    data = report.to_json()
    assert data["totals"] == {"hits": 206, "scanners": 3, "bans": 2, "refused": 6, "near_misses": 1}
    first = data["scanners"][0]
    assert (first["address"], first["hits"], first["ports"], first["port_count"]) == \
        ("198.18.0.2", 200, "1-100", 100)
    assert first["banned"] and first["evidence"] == "packets" and first["origin"] == "local"
    assert first["offences"] == 1
    assert data["scanners"][1]["evidence"] == "connection"
    assert data["scanners"][1]["name"] == "scanner.example" and first["name"] is None
    assert data["near_misses"] == [{"address": "198.18.1.9", "hits": 1}]
    assert data["top_networks"][0] == {"network": "198.18.0.0/24", "hits": 205, "scanners": 2}
    assert data["top_ports"][0] == {"port": 79, "hits": 7}
    assert sum(p["hits"] for p in data["timeline"]["points"]) == 206 and data["timeline"]["bucket"] == "hour"
    assert sum(p["bans"] for p in data["timeline"]["points"]) == 2
    assert errors(data, SCHEMA) == []


def test_the_four_formats_agree(tmp_path: Path) -> None:
    report = report_of(tmp_path)
    data = json.loads(as_json(report))
    rows = list(csv.DictReader(io.StringIO(as_csv(report))))
    assert [csv_row(s) for s in data["scanners"]] == rows
    assert rows[1]["name"] == "scanner.example"
    page = as_html(report)
    for key, value in data["totals"].items():
        assert f'data-key="{key}">{value}</b>' in page
    bars = [int(v) for v in re.findall(r'<rect [^>]*fill="#2b6cb0" data-value="(\d+)"', page)]
    assert bars == [p["hits"] for p in data["timeline"]["points"]]
    assert "<script" not in page and "<link" not in page and "src=" not in page  # self-contained
    assert "<td>scanner.example</td>" in page
    lines = text(report).splitlines()
    assert "  scanner.example; ports 79; Connect" in lines
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "206 hits from 3 scanners, 2 bans, 6 blocks refused by the guards, 1 near misses" in lines[1]


def csv_row(scanner: dict[str, object]) -> dict[str, str]:
    """A JSON scanner as its CSV row reads: scan types joined by ';', null empty."""
    def cell(key: str, value: object) -> str:
        if key == "scan_types":
            return ";".join(value)  # type: ignore[arg-type]
        return "" if value is None else str(value)
    return {key: cell(key, value) for key, value in scanner.items()}


texts = st.one_of(st.none(), st.text(max_size=12))
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@st.composite
def scanners(draw: st.DrawFn) -> Scanner:
    ports = sorted(draw(st.sets(st.integers(1, 65535), min_size=1, max_size=8)))
    counts = st.integers(0, 10**9)
    return Scanner(draw(st.text(min_size=1, max_size=20)), draw(times), draw(times), draw(counts),
                   draw(counts),
                   ports, draw(st.lists(st.text(max_size=20), max_size=3)),
                   draw(st.sampled_from(["packets", "connection"])), draw(st.booleans()),
                   draw(st.one_of(st.none(), times)), draw(st.integers(0, 99)), draw(texts), draw(texts))


@given(st.lists(scanners(), max_size=5))
def test_the_fast_json_writer_is_json_dumps_of_to_json(found: list[Scanner]) -> None:
    report = Report(NOW - 3600, NOW, "hour", found, near_misses=[("198.18.0.9", 1)])
    assert as_json(report) == json.dumps(report.to_json(), separators=(",", ":")) + "\n"
    rows = list(csv.DictReader(io.StringIO(as_csv(report), newline="")))
    assert rows == [csv_row(s) for s in report.to_json()["scanners"]]


def test_a_write_between_the_two_passes_is_counted_again_in_one_snapshot(tmp_path: Path, monkeypatch) -> None:
    from portsentry.report import data

    real = data._tally_in

    def behind(path: str, column: str, window: data.Window) -> object:
        tally = real(path, column, window)
        tally.total += 1  # as if a write had landed in its snapshot and not in the other
        tally.ports[9999] += 1
        return tally

    monkeypatch.setattr(data, "_tally_in", behind)
    report = report_of(tmp_path)
    assert 9999 not in dict(report.top_ports) and sum(h for _, h, _ in report.timeline) == 206


def test_a_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    from portsentry.report.data import ReportError

    with pytest.raises(ReportError, match="cannot read the ban store"):
        open_read_only(str(tmp_path / "none.sqlite3"))


def test_since() -> None:
    assert parse_since("24h", NOW) == NOW - 86400
    assert parse_since("90m", NOW) == NOW - 5400
    assert parse_since("2w", NOW) == NOW - 14 * 86400
    assert parse_since("2026-12-01", NOW) > 0
    for bad in ("yesterday", "24", "-1h", "1y", ""):
        with pytest.raises(SinceError):
            parse_since(bad, NOW)


@given(st.text(max_size=40))
def test_since_never_raises_anything_else(text_: str) -> None:
    with contextlib.suppress(SinceError):
        parse_since(text_, NOW)


@given(st.sets(st.integers(1, 65535), max_size=60))
def test_ranges_are_format_ports(ports: set[int]) -> None:
    from portsentry.core.ports import format_ports
    from portsentry.report.data import ranges

    assert ranges(sorted(ports)) == format_ports(ports)


def test_scan_types_with_commas_and_ports_seen_twice_come_out_once_each(tmp_path: Path) -> None:
    """The per-source pass asks SQLite for distinct ports and kinds; a kind with a comma (1.2's
    "Unknown Type" texts have none, but the store is a file) is still one kind."""
    path = tmp_path / "bans.sqlite3"
    store = BanStore(str(path))
    odd = "Unknown, odd"
    store.add_hits([HitRow("198.18.0.5", 80, "atcp", HOUR, odd, 1, 1, NOW, NOW),
                    HitRow("198.18.0.5", 80, "atcp", HOUR - 1, odd, 1, 1, NOW - 3600, NOW - 3600),
                    HitRow("198.18.0.5", 22, "atcp", HOUR, SYN, 1, 1, NOW, NOW)], [])
    store.close()
    db = open_read_only(str(path))
    try:
        (scanner,) = build(db, NOW - 86400, NOW).scanners
    finally:
        db.close()
    assert (scanner.ports, scanner.scan_types, scanner.hits) == ([22, 80], [SYN, odd], 3)


def _damaged(tmp_path: Path, offset: int, garbage: bytes) -> Path:
    path = generated(tmp_path)
    data = bytearray(path.read_bytes())
    size = len(data)
    offset %= size
    data[offset:offset + len(garbage)] = garbage
    path.write_bytes(bytes(data[:size]))  # damaged in place, never longer
    return path


def test_a_damaged_store_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys) -> None:
    """The bans table's root page (page 3) overwritten: `hits` still reads, so the store opens,
    and the damage shows only once the report reads the bans."""
    from argparse import Namespace

    from portsentry.cli.report import report_main
    from portsentry.config.settings import Config

    _damaged(tmp_path, 2 * 4096, b"\xa5" * 4096)
    args = Namespace(since="1d", format="text", output=None)
    assert report_main(Config(source="t", state_dir=str(tmp_path)), args, NOW) == 1
    said = capsys.readouterr().err
    assert "cannot read the ban store" in said and "malformed" in said, said


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.binary(min_size=1, max_size=600))
def test_a_store_damaged_anywhere_reports_or_raises_report_error(offset: int, garbage: bytes) -> None:
    from portsentry.report.data import ReportError

    with tempfile.TemporaryDirectory() as directory:
        try:
            db = open_read_only(str(_damaged(Path(directory), offset, garbage)))
        except ReportError:
            return
        try:
            build(db, NOW - 86400, NOW)
        except ReportError:
            pass
        finally:
            db.close()


def test_a_stored_text_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    """SQLite stores text bytes unchecked; Python's decoding raised UnicodeDecodeError."""
    from portsentry.report.data import ReportError

    path = generated(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"198.18.1.9", b"198.18.1.\xff"))
    db = open_read_only(str(path))
    try:
        with pytest.raises(ReportError, match="cannot read the ban store"):
            build(db, NOW - 86400, NOW)
    finally:
        db.close()


def test_the_window_is_not_widened_to_whole_hours(tmp_path: Path) -> None:
    """Hits are kept per hour with their first and last time: a row wholly before --since (or
    after the end) is not the window's, even in the hour --since falls in. `--since 10m` once
    listed a scan made 50 minutes ago, and `--since 0m` the whole hour's hits."""
    path = tmp_path / "bans.sqlite3"
    store = BanStore(str(path))
    start = HOUR * 3600.0
    store.add_hits([HitRow("198.18.0.2", 79, "tcp", HOUR, "Connect", 4, 0, start + 60, start + 600),
                    HitRow("198.18.0.3", 111, "tcp", HOUR, "Connect", 1, 0, start + 2000, start + 2000),
                    HitRow("198.18.0.4", 1, "tcp", HOUR, "Connect", 2, 0, start + 3500, start + 3550)],
                   [])
    store.close()
    db = open_read_only(str(path))
    try:
        data = build(db, start + 1800, start + 3000).to_json()
    finally:
        db.close()
    assert [(s["address"], s["hits"]) for s in data["scanners"]] == [("198.18.0.3", 1)]
    assert data["totals"]["hits"] == 1 and data["top_ports"] == [{"port": 111, "hits": 1}]
    assert sum(point["hits"] for point in data["timeline"]["points"]) == 1


def test_a_since_in_the_future_or_before_1970_is_a_clear_error() -> None:
    """A window that ends before it starts was an empty report with no word of why; one that
    starts 19,000 years ago (999999w) was a timeline of 7 million days (29 s, 2.8 GB, 340 MB)."""
    with pytest.raises(SinceError, match="in the future"):
        parse_since("2100-01-01", NOW)
    with pytest.raises(SinceError, match="in the future"):
        parse_since("2027-01-15T08:01+00:00", NOW)  # a minute after NOW
    for long_ago in ("999999w", "99999d", "1900-01-01"):
        with pytest.raises(SinceError, match="before 1970"):
            parse_since(long_ago, NOW)
    assert parse_since("0m", NOW) == NOW and parse_since("2000w", NOW) == NOW - 2000 * 7 * 86400


def test_a_store_damaged_at_its_opening_is_not_taken_for_a_missing_one(tmp_path: Path) -> None:
    """"has portsentry run here?" fits a store that is not there; said of a damaged one, it sent
    the admin looking for the wrong file."""
    from portsentry.report.data import ReportError

    with pytest.raises(ReportError, match="has portsentry run here") as missing:
        open_read_only(str(tmp_path / "none.sqlite3"))
    assert "malformed" not in str(missing.value)
    path = _damaged(tmp_path, 0, b"\xa5" * 4096)  # the header and the schema page
    with pytest.raises(ReportError, match="cannot read the ban store") as damaged:
        open_read_only(str(path))
    assert "has portsentry run here" not in str(damaged.value)
