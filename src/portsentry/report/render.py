"""The four formats of one Report: text for an 80-column terminal, JSON (docs/report.schema.json),
CSV (one row per scanner) and one self-contained HTML page with inline SVG charts (no external
assets: it works offline and prints). All read the same Report, so their numbers agree.
"""

from __future__ import annotations

import csv
import html
import io
import json
import time
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii as _string  # json.dumps's own (C)

from portsentry.report.data import Report, Scanner, ranges

SCANNER_ROWS = 50  # in text and HTML; JSON and CSV have them all


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def text(report: Report) -> str:
    out = [
        f"PortSentry report {_when(report.since)} to {_when(report.until)}",
        f"{report.hits} hits from {len(report.scanners)} scanners, {report.bans} bans, "
        f"{sum(c for _, c in report.refused)} blocks refused by the guards, "
        f"{len(report.near_misses)} near misses",
        "",
    ]
    out.append(f"{'SCANNER':<26}{'HITS':>7} {'PORTS':>5} {'LAST SEEN':<16} {'BANNED':<6} {'EVIDENCE':<10}")
    for s in report.scanners[:SCANNER_ROWS]:
        out.append(
            f"{_cut(s.address, 25):<26}{s.hits:>7} {len(s.ports):>5} {_when(s.last_seen):<16} "
            f"{'yes' if s.banned else 'no':<6} {s.evidence:<10}"
        )
        detail = f"ports {_cut(ranges(s.ports), 50)}; {_cut(', '.join(s.scan_types), 20)}"
        out.append(f"  {_cut(f'{s.name}; {detail}', 78) if s.name else detail}")
    if len(report.scanners) > SCANNER_ROWS:
        out.append(f"... and {len(report.scanners) - SCANNER_ROWS} more (--format csv or json lists all)")
    for title, rows in (
        ("TOP PORTS", [(str(p), h) for p, h in report.top_ports]),
        ("TOP SCAN TYPES", report.top_scan_types),
        ("TOP NETWORKS", [(f"{n} ({m} scanners)", h) for n, h, m in report.top_networks]),
        ("REFUSED BY THE GUARDS", report.refused),
        ("NEAR MISSES (below SCAN_TRIGGER)", report.near_misses),
    ):
        out += ["", title]
        out += [f"  {_cut(label, 60):<62}{count:>10}" for label, count in rows] or ["  none"]
    out += ["", f"HITS AND BANS PER {report.bucket.upper()}"]
    peak = max((hits for _, hits, _ in report.timeline), default=0) or 1
    for start, hits, bans in report.timeline:
        if hits or bans:
            bar = "#" * max(1, round(40 * hits / peak)) if hits else ""
            out.append(f"  {_when(start):<16} {hits:>8} {bans:>5}  {bar}")
    return "\n".join(out) + "\n"


def as_json(report: Report) -> str:
    """Report.to_json() as compact JSON, keys in the schema's order. The scanners (a hundred
    thousand and more) are written by `_scanner_json` without a dict each, a third of the time;
    a property test holds the result equal to json.dumps(report.to_json())."""
    data = report.to_json(scanners=False)
    head = {key: data.pop(key) for key in ("schema", "since", "until", "totals")}
    return (json.dumps(head, separators=(",", ":"))[:-1] + ',"scanners":['
            + ",".join(map(_scanner_json, report.scanners)) + "],"
            + json.dumps(data, separators=(",", ":"))[1:] + "\n")


def _text(value: str | None) -> str:
    return "null" if value is None else _string(value)


def _number(value: float | None) -> str:
    return "null" if value is None else repr(float(value))


def _scanner_json(s: Scanner) -> str:
    # Every string goes through json's own C string encoder; numbers as json writes them.
    return (f'{{"address":{_string(s.address)},"first_seen":{_number(s.first_seen)},'
            f'"last_seen":{_number(s.last_seen)},"hits":{int(s.hits)},"below_trigger":{int(s.below_trigger)},'
            f'"ports":"{ranges(s.ports)}","port_count":{len(s.ports)},'
            f'"scan_types":[{",".join(map(_string, s.scan_types))}],"evidence":{_string(s.evidence)},'
            f'"banned":{"true" if s.banned else "false"},"ban_expires":{_number(s.ban_expires)},'
            f'"offences":{int(s.offences)},"origin":{_text(s.origin)},"name":{_text(s.name)}}}')


CSV_FIELDS = (
    "address",
    "first_seen",
    "last_seen",
    "hits",
    "below_trigger",
    "port_count",
    "ports",
    "scan_types",
    "evidence",
    "banned",
    "ban_expires",
    "offences",
    "origin",
    "name",
)


def as_csv(report: Report) -> str:
    """One row per scanner, the JSON's values in CSV_FIELDS order (scan types joined by ';',
    null as an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # CRLF: with "\n" alone a "\r" in a field went unquoted
    writer.writerow(CSV_FIELDS)
    writer.writerows(
        (s.address, s.first_seen, s.last_seen, s.hits, s.below_trigger, len(s.ports), ranges(s.ports),
         ";".join(s.scan_types), s.evidence, s.banned, "" if s.ban_expires is None else s.ban_expires,
         s.offences, s.origin or "", s.name or "")
        for s in report.scanners)
    return buffer.getvalue()


def _bars(points: list[tuple[str, int]], width: int = 640, height: int = 180, color: str = "#2b6cb0") -> str:
    """A vertical bar chart as inline SVG; every bar carries its value."""
    peak = max((v for _, v in points), default=0) or 1
    step = width / max(1, len(points))
    bars = []
    for i, (label, value) in enumerate(points):
        h = (height - 20) * value / peak
        bars.append(
            f'<rect x="{i * step + 1:.1f}" y="{height - 20 - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{color}" data-value="{value}"><title>{html.escape(label)}: '
            f"{value}</title></rect>"
        )
    first = html.escape(points[0][0]) if points else ""
    last = html.escape(points[-1][0]) if points else ""
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img">{"".join(bars)}<text x="0" y="{height - 4}" font-size="11">{first}</text>'
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{last}</text>'
        f'<text x="0" y="12" font-size="11">max {peak}</text></svg>'
    )


def _hbars(rows: list[tuple[str, int]], width: int = 460) -> str:
    peak = max((v for _, v in rows), default=0) or 1
    height = 22 * len(rows) + 4
    # Room for the longest label (about 7 px a character at 12 px), at most half the width.
    left = min(width // 2, 10 + 7 * max((len(label) for label, _ in rows), default=4))
    items = []
    for i, (label, value) in enumerate(rows):
        w = (width - left - 60) * value / peak
        items.append(
            f'<text x="0" y="{i * 22 + 16}" font-size="12">{html.escape(label)}</text>'
            f'<rect x="{left}" y="{i * 22 + 4}" width="{w:.1f}" height="16" fill="#c05621" '
            f'data-value="{value}"></rect><text x="{left + 4 + w:.1f}" y="{i * 22 + 16}" font-size="12">'
            f"{value}</text>"
        )
    size = f'viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
    return f'<svg class="chart" {size}>{"".join(items)}</svg>'


def _table(headers: tuple[str, ...], rows: Sequence[Sequence[object]], cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    body = body or "<tr><td>none</td></tr>"
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#1a202c;max-width:70em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #cbd5e0}
.totals{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #cbd5e0;border-radius:6px;padding:.6em 1em}
.card b{display:block;font-size:1.6em}table{border-collapse:collapse;font-size:.9em}
td,th{border-bottom:1px solid #e2e8f0;padding:.25em .6em;text-align:left}
.grid{display:flex;gap:2em;flex-wrap:wrap}@media print{body{margin:0}.chart{max-width:100%}}
"""


def as_html(report: Report) -> str:
    totals = report.to_json()["totals"]
    cards = "".join(
        f'<div class="card"><b data-key="{key}">{value}</b>{html.escape(key.replace("_", " "))}</div>'
        for key, value in totals.items()
    )
    timeline = [
        (time.strftime("%m-%d %H:%M", time.localtime(start)), hits) for start, hits, _ in report.timeline
    ]
    bans = [(time.strftime("%m-%d %H:%M", time.localtime(start)), b) for start, _, b in report.timeline]
    scanners = [
        (
            s.address,
            s.hits,
            ranges(s.ports),
            ", ".join(s.scan_types),
            s.evidence,
            "yes" if s.banned else "no",
            s.offences,
            _when(s.first_seen),
            _when(s.last_seen),
            s.origin or "-",
            s.name or "-",
        )
        for s in report.scanners[:SCANNER_ROWS]
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PortSentry report</title><style>{STYLE}</style></head>
<body>
<h1>PortSentry report</h1>
<p>{html.escape(_when(report.since))} to {html.escape(_when(report.until))}</p>
<div class="totals">{cards}</div>
<h2>Hits per {report.bucket}</h2>
{_bars(timeline)}
<h2>Bans per {report.bucket}</h2>
{_bars(bans, height=120, color="#9b2c2c")}
<div class="grid">
<div><h2>Top ports</h2>{_hbars([(str(p), h) for p, h in report.top_ports])}</div>
<div><h2>Top scan types</h2>{_hbars(report.top_scan_types)}</div>
</div>
<h2>Scanners</h2>
{
        _table(
            (
                "address",
                "hits",
                "ports",
                "scan types",
                "evidence",
                "banned",
                "offences",
                "first seen",
                "last seen",
                "origin",
                "name",
            ),
            scanners,
            "scanners",
        )
    }
<h2>Top networks</h2>
{_table(("network", "hits", "scanners"), report.top_networks, "networks")}
<h2>Refused by the guards</h2>
{_table(("reason", "count"), report.refused, "refused")}
<h2>Near misses (below SCAN_TRIGGER)</h2>
{_table(("address", "hits"), report.near_misses, "near")}
</body></html>
"""


FORMATS = {"text": text, "json": as_json, "csv": as_csv, "html": as_html}
