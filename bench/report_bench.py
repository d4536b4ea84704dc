"""Issue 13: how long `portsentry report` takes over a million recorded hits. Part `report` of
bench/run. The store is filled through BanStore.add_hits with the worst shape for a report: every
hit its own aggregate row (a distinct source, port and hour each time: 1,000,000 rows from 131,072
scanners over 24 hours). Each format is then produced by `python -m portsentry report` as a new
process (wall time, Python's start included), `--since 24h`, written to a file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.system.teardown import run_tempdir

from bench import harness
from portsentry.bans.store import BanStore
from portsentry.journal.hits import HitRow

BEGIN = "<!-- bench:issue13:begin (written by bench/run --only report) -->"
END = "<!-- bench:issue13:end -->"
TITLE = "Report over a million hits (issue 13)"
HITS = 1_000_000
SCANNERS = 131_072  # the sources of the rows below: 198.18.0.0-198.19.255.255
FORMATS = ("text", "json", "csv", "html")


def fill(path: Path, now: float) -> float:
    hour = int(now // 3600)
    store = BanStore(str(path))
    rows = [HitRow(f"198.{18 + (i >> 16) % 2}.{(i >> 8) & 255}.{i & 255}", 1 + i % 1024, "atcp",
                   hour - i % 24, "TCP SYN/Normal scan", 1, 0, now - 3600 * (i % 24), now - 3600 * (i % 24))
            for i in range(HITS)]
    # Every scanner named, as RESOLVE_HOST would have it: the most a report has to join.
    names = [(row.source, f"host-{i}.bench.test", now) for i, row in enumerate(rows[:SCANNERS])]
    started = time.perf_counter()
    store.add_hits(rows, [(hour, "ban rate limit reached", 10)], names)
    store.close()
    return time.perf_counter() - started


def measure(repeat: int, command: str, rev: str | None, load_at_start: str) -> str:
    work = run_tempdir("bench-report")
    try:
        now = time.time()
        filled = fill(work / "bans.sqlite3", now)
        conf = work / "portsentry.conf"
        conf.write_text(f'STATE_DIR="{work}"\nCONTROL_SOCKET="{work}/none.sock"\n')
        times: dict[str, list[float]] = {f: [] for f in FORMATS}
        sizes: dict[str, int] = {}
        for _ in range(repeat):
            for fmt in FORMATS:
                out = work / f"report.{fmt}"
                started = time.perf_counter()
                argv = [sys.executable, "-m", "portsentry", "report", "-c", str(conf), "--since", "24h",
                        "--format", fmt, "-o", str(out)]
                subprocess.run(argv, check=True, timeout=300)
                times[fmt].append(time.perf_counter() - started)
                sizes[fmt] = out.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}` (as root) on "
        f"{harness.describe_source(rev)}; load average at start {load_at_start}. {HITS:,} hits, each its "
        f"own aggregate row (131,072 scanners, each with a host name, 1,024 ports, 24 hours), stored "
        f"in {filled:.1f} s; the "
        "wall time of `portsentry report --since 24h --format F -o FILE`, one value per run.",
        "",
        "| format | seconds | output size |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {fmt} | {' / '.join(f'{t:.2f}' for t in times[fmt])} | {sizes[fmt] / 1e6:.1f} MB |"
              for fmt in FORMATS]
    return "\n".join(lines) + "\n"


def write_block(doc: Path, block: str) -> None:
    harness.write_section(doc, TITLE, BEGIN, END, block)
