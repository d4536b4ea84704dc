"""Metrics scraped during a real scan move; the JSON event log validates against its schema."""

from __future__ import annotations

import json
import re

from tests.system.rig import cli_argv, daemon_env, eventually, nmap, run_in
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


def test_bans_and_lifts_made_beside_the_daemon_are_reported_once(daemon_factory, namespaces, tmp_path):
    # `block --file` writes the store straight, and `block`/`unblock` do while the daemon is down:
    # the daemon reports them from the store's feed, each once, also across restarts.
    net = namespaces
    events = tmp_path / "events.jsonl"
    daemon = daemon_factory("-stcp", TCP_PORTS="1", BLOCK_TCP="1", BAN_BACKEND="nftables",
                            BLOCK_TIME="600", METRICS_LISTEN="127.0.0.1:9471", EVENT_LOG=str(events))

    def cli(*args: str) -> str:
        result = run_in(net.target, cli_argv(daemon.conf_path, *args), env=daemon_env())
        assert result.returncode == 0, result.stderr
        return result.stdout

    def logged(kind: str) -> list[dict[str, object]]:
        parsed = [json.loads(line) for line in events.read_text().splitlines()]
        for event in parsed:
            assert_valid(event)
        return [event for event in parsed if event["event"] == kind]

    feed = tmp_path / "feed.txt"
    feed.write_text("198.19.7.1\n198.19.7.2\n198.19.7.3\n")
    cli("block", "--file", str(feed))
    eventually(lambda: len(logged("ban")) == 3, timeout=5, what="three ban events")
    assert {e["src"] for e in logged("ban")} == {"198.19.7.1", "198.19.7.2", "198.19.7.3"}
    assert {(e["reason"], e["backend"], e["duration"]) for e in logged("ban")} == {
        ("manual block", "nftables", 600)}
    eventually(lambda: total(scrape(net.target, 9471), "portsentry_bans_total") == 3, timeout=5,
               what="three bans counted")
    lone = tmp_path / "lone.txt"
    lone.write_text("198.19.7.3\n")
    cli("unblock", "--file", str(lone))
    eventually(lambda: [e["src"] for e in logged("unban")] == ["198.19.7.3"], timeout=5, what="unban event")
    assert logged("unban")[0]["reason"] == "unblocked by admin"
    daemon.stop()
    cli("block", "198.19.7.9", "--for", "1h")
    cli("unblock", "198.19.7.2")
    daemon.start()
    eventually(lambda: len(logged("ban")) == 4 and len(logged("unban")) == 2, timeout=5,
               what="the changes made while the daemon was down")
    assert logged("ban")[-1]["src"] == "198.19.7.9" and logged("ban")[-1]["duration"] == 3600
    assert logged("unban")[-1]["src"] == "198.19.7.2"
    values = scrape(net.target, 9471)
    assert total(values, "portsentry_bans_total") == 1
    assert values.get('portsentry_unbans_total{reason="admin"}') == 1
    # Reported once: another restart says nothing of them again.
    daemon.stop()
    daemon.start()
    run_in(net.target, ["sleep", "2"])
    assert len(logged("ban")) == 4 and len(logged("unban")) == 2
    assert total(scrape(net.target, 9471), "portsentry_bans_total") == 0
    # `portsentry report` reads the store's history, whoever wrote it.
    report = json.loads(cli("report", "--since", "1h", "--format", "json"))
    assert report["totals"]["bans"] == 4
