"""Metrics scraped during a real scan move; the JSON event log validates against its schema."""

from __future__ import annotations

import json
import re

from tests.system.rig import eventually, nmap, run_in
from tests.unit.journal.test_events import assert_valid


def scrape(ns: str, port: int) -> dict[str, float]:
    out = run_in(ns, ["python3", "-c", f"import urllib.request; print(urllib.request.urlopen("
                                       f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"])
    values: dict[str, float] = {}
    for line in out.stdout.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


def total(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


def test_metrics_move_and_events_validate_during_a_scan(daemon_factory, namespaces, syslog, tmp_path):
    net = namespaces
    events = tmp_path / "events.jsonl"
    daemon_factory("-stcp", BLOCK_TCP="1", BAN_BACKEND="nftables", BLOCK_TIME="2",
                   METRICS_LISTEN="127.0.0.1:9470", EVENT_LOG=str(events))
    before = scrape(net.target, 9470)
    assert total(before, "portsentry_probes_total") == 0
    nmap(net.scanner, ["-sS", "-p", "1,11,15,79,111", "--max-retries", "0", net.target_ip4])
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")

    def moved() -> bool:
        after = scrape(net.target, 9470)
        return (total(after, "portsentry_probes_total") >= 1 and total(after, "portsentry_bans_total") >= 1
                and total(after, 'portsentry_bans_active{backend="nftables"}') == 1)

    eventually(moved, timeout=5, what="probe, ban and active-ban metrics")
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been unblocked: ban expired", timeout=10)
    eventually(lambda: total(scrape(net.target, 9470), "portsentry_unbans_total") == 1, timeout=5,
               what="unban counted")
    lines = events.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    for event in parsed:
        assert_valid(event)
    kinds = [event["event"] for event in parsed]
    assert "probe" in kinds and "ban" in kinds and "unban" in kinds
    first = next(e for e in parsed if e["event"] == "probe")
    assert (first["src"], first["mode"], first["kind"], first["action"]) == (
        net.scanner_ip4, "stcp", "TCP SYN/Normal scan", "block")
