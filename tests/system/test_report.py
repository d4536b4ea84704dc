"""`portsentry report` after a real scan, and its HTML rendered by a real headless browser
(Debian's chromium, from scripts/setup): the charts are there, and the numbers on the page are the
JSON's. Chromium runs in the test's namespace with its profile in a temp dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.system.rig import Daemon, daemon_env, eventually, nmap, run_in

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

SCREENSHOT_DIR = os.environ.get("PORTSENTRY_REPORT_SCREENSHOT")  # keep the PNG for a human to look at


def report(daemon: Daemon, *args: str) -> str:
    argv = [sys.executable, "-m", "portsentry", "report", "-c", str(daemon.conf_path), *args]
    done = run_in(daemon.net.target, argv, env=daemon_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_real_scan_is_reported_and_the_html_renders_with_the_json_numbers(
        daemon_factory, namespaces, syslog, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is installed by scripts/setup")
    net = namespaces
    daemon = daemon_factory("-stcp", TCP_PORTS="1,79,111", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$")
    nmap(net.scanner, ["-sS", "-p", "1,79,111", "--max-retries", "0", net.target_ip4])
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via wrappers")

    def scanned() -> bool:
        data = json.loads(report(daemon, "--format", "json"))
        found = [s for s in data["scanners"] if s["address"] == net.scanner_ip4]
        return bool(found) and found[0]["hits"] >= 1

    eventually(scanned, timeout=10, what="the scan in the report (written once a second)")
    data = json.loads(report(daemon, "--format", "json"))
    (me,) = [s for s in data["scanners"] if s["address"] == net.scanner_ip4]
    assert me["banned"] and me["evidence"] == "packets" and me["scan_types"] == ["TCP SYN/Normal scan"]
    assert data["totals"]["bans"] >= 1 and data["totals"]["hits"] == sum(s["hits"] for s in data["scanners"])
    assert net.scanner_ip4 in report(daemon)  # the text format too

    page = tmp_path / "report.html"
    report(daemon, "--format", "html", "-o", str(page))
    shot = tmp_path / "report.png"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}/profile",
               "--window-size=1100,1500", "--hide-scrollbars"]
    done = run_in(net.target, [*browser, f"--screenshot={shot}", f"file://{page}"], timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000, done.stderr[-2000:]
    dom = run_in(net.target, [*browser, "--dump-dom", f"file://{page}"], timeout=120).stdout
    shown = dict(re.findall(r'<b data-key="(\w+)">(\d+)</b>', dom))
    assert {key: int(value) for key, value in shown.items()} == data["totals"]
    assert dom.count('<svg class="chart"') >= 4  # hits and bans over time, top ports, top scan types
    bars = [int(v) for v in re.findall(r'fill="#2b6cb0" data-value="(\d+)"', dom)]
    assert bars == [p["hits"] for p in data["timeline"]["points"]]
    assert f"<td>{net.scanner_ip4}</td>" in dom
    if SCREENSHOT_DIR:
        shutil.copy(shot, Path(SCREENSHOT_DIR) / "report.png")


def test_a_resolved_host_name_reaches_the_report(daemon_factory, namespaces, syslog, tmp_path):
    """RESOLVE_HOST=1: the daemon runs with a private /etc/hosts (a bind mount in a mount
    namespace of its own: the machine's file is untouched) that names the scanner; the report
    shows that name next to the address in every format."""
    net = namespaces
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{net.scanner_ip4} scanner.report.test\n")
    daemon = daemon_factory("-stcp", start=False, TCP_PORTS="1,79,111", BLOCK_TCP="0", RESOLVE_HOST="1")
    daemon.command = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                      'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *daemon.command]
    daemon.start()
    nmap(net.scanner, ["-sS", "-p", "1,79,111", "--max-retries", "0", net.target_ip4])
    syslog.wait_for("scanner.report.test")

    def named() -> bool:
        data = json.loads(report(daemon, "--format", "json"))
        return any(s["name"] == "scanner.report.test" for s in data["scanners"])

    eventually(named, timeout=10, what="the name in the report (written once a second)")
    assert f"{net.scanner_ip4},".encode() in report(daemon, "--format", "csv").encode()
    assert "scanner.report.test" in report(daemon, "--format", "csv")
    assert "  scanner.report.test; ports 1,79,111" in report(daemon)
    assert "<td>scanner.report.test</td>" in report(daemon, "--format", "html")
    assert "scanner.report.test" not in (Path("/etc/hosts").read_text())
