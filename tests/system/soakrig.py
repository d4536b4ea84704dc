"""Readings for soak runs (tests/system/test_soak.py, bench/soak.py): what a long-running daemon
could leak or leave behind, read from /proc, the ban store, the target namespace's nftables
table and routes, and hosts.deny; and the routes that bring tests/system/churn.py's sources in."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.system import rig
from tests.system.churn import real_addresses

CHURN = Path(__file__).with_name("churn.py")
FORGED_NETS = ("198.19.0.0/16", "fd00:19::/48")
STORE_TABLES = ("bans", "history", "offenders", "hits", "written_lines")


def route_churn(net: rig.Namespaces, real: int = 0) -> None:
    """The churn's forged networks routed from the target to the scanner, and `real` addresses
    on the scanner's lo for completed connects."""
    for network in (*FORGED_NETS, "198.18.64.0/18"):
        via = net.scanner_ip6 if ":" in network else net.scanner_ip4
        rig.run_in(net.target, ["ip", "route", "add", network, "via", via], check=True)
    if real:
        rig.run_in(net.scanner, ["ip", "-batch", "-"], check=True, input_text="".join(
            f"addr add {address}/32 dev lo\n" for address in real_addresses(real)))


def start_churn(net: rig.Namespaces, seconds: float, *args: str) -> subprocess.Popen[bytes]:
    """tests/system/churn.py in the scanner namespace, against the target's first link."""
    return rig.popen_in(net.scanner, [sys.executable, str(CHURN), net.target_ip4, net.target_ip6,
                                      "--seconds", str(seconds), *args],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def nft_elements(ns: str, table: str = "portsentry") -> dict[str, int]:
    """Elements per set of our nftables table ({} when there is no table)."""
    out = rig.run_in(ns, ["nft", "-j", "list", "table", "inet", table])
    if out.returncode != 0:
        return {}
    return {item["set"]["name"]: len(item["set"].get("elem", []))
            for item in json.loads(out.stdout)["nftables"] if "set" in item}


def blackhole_routes(ns: str) -> int:
    """Blackhole routes of both families in `ns` (what KILL_ROUTE adds)."""
    total = 0
    for family in ("-4", "-6"):
        out = rig.run_in(ns, ["ip", family, "route", "show", "type", "blackhole"], check=True)
        total += sum(1 for line in out.stdout.splitlines() if line.strip())
    return total


def store_counts(path: Path, now: float) -> dict[str, int]:
    """Rows per table of the ban store, and `active`: bans in force at `now`."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        counts = {t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in STORE_TABLES}
        counts["active"] = int(db.execute(
            "SELECT count(*) FROM bans WHERE expires IS NULL OR expires > ?", (now,)).fetchone()[0])
        return counts
    finally:
        db.close()


def children(pid: int) -> tuple[int, int]:
    """(child processes, zombies among them) of `pid`."""
    out = subprocess.run(["ps", "-o", "stat=", "--ppid", str(pid)], capture_output=True, text=True,
                         check=False)
    states = [s.strip() for s in out.stdout.splitlines() if s.strip()]
    return len(states), sum(s.startswith("Z") for s in states)


def process(pid: int) -> dict[str, int]:
    """Open fds, threads and resident memory (KiB) of `pid`."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(fields["Threads"]),
            "rss_kib": int(fields["VmRSS"].split()[0])}


def lines(path: Path) -> int:
    """Lines of a file other than blank ones and comments (0 when it does not exist)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if line.strip() and not line.startswith("#"))
