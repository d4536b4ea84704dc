"""Forged stealth hits cannot make the host block its gateway or resolver, or ban faster than the cap."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.system.rig import daemon_env, eventually, run_in

SPOOF = str(Path(__file__).with_name("spoof.py"))
GATEWAY = "198.18.0.254"
RESOLVER = "198.18.0.53"


def test_forged_hits_from_gateway_and_resolver_never_block(daemon_factory, namespaces, syslog, tmp_path):
    net = namespaces
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {RESOLVER}\n")
    for address in (GATEWAY, RESOLVER):
        run_in(net.scanner, ["ip", "addr", "add", f"{address}/24", "dev", "eth0"], check=True)
    run_in(net.target, ["ip", "route", "add", "default", "via", GATEWAY], check=True)
    daemon = daemon_factory("-stcp", BLOCK_TCP="1", BAN_BACKEND="nftables", RESOLV_CONF=str(resolv))
    for forged in (GATEWAY, RESOLVER):
        sent = run_in(net.scanner, [sys.executable, SPOOF, net.target_ip4, "1", forged, "1", "100"])
        assert sent.stdout.strip() == "1", sent.stderr
        syslog.wait_for(f"attackalert: Host: {forged}/{forged} is not blocked: it is a default gateway "
                        "or DNS resolver of this host (spoofing guard)")
    # Repeats are not logged again; nothing is banned.
    for forged in (GATEWAY, RESOLVER):
        run_in(net.scanner, ["hping3", "-q", "-S", "-a", forged, "-p", "111", "-c", "20", "-i", "u2000",
                             net.target_ip4], timeout=20)
    syslog.assert_absent(f"Host {GATEWAY} has been blocked", wait=1.0)
    assert len(syslog.find_all("is not blocked: it is a default gateway")) == 2
    listing = run_in(net.target, [sys.executable, "-m", "portsentry", "list", "--json", "-c",
                                  str(daemon.conf_path)], env=daemon_env())
    assert json.loads(listing.stdout) == []
    # A real scanner is still blocked.
    run_in(net.scanner, ["hping3", "-q", "-S", "-p", "1", "-c", "1", net.target_ip4], timeout=10)
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")


def test_spoofed_flood_bans_no_faster_than_the_cap(daemon_factory, namespaces, syslog):
    net = namespaces
    run_in(net.target, ["ip", "route", "add", "198.18.128.0/17", "via", net.scanner_ip4], check=True)
    daemon = daemon_factory("-stcp", BLOCK_TCP="1", BAN_BACKEND="nftables", BAN_RATE_LIMIT="25")
    sent = run_in(net.scanner, [sys.executable, SPOOF, net.target_ip4, "1", "198.18.128.1", "3000", "3000"],
                  timeout=60)
    assert sent.stdout.strip() == "3000", sent.stderr
    syslog.wait_for("attackalert: ban rate limit reached (25 new bans per minute)")

    def bans() -> list[object]:
        out = run_in(net.target, [sys.executable, "-m", "portsentry", "list", "--json", "-c",
                                  str(daemon.conf_path)], env=daemon_env()).stdout
        return list(json.loads(out))

    eventually(lambda: len(bans()) == 25, timeout=10, what="25 bans")
    run_in(net.target, ["sleep", "1"])
    assert len(bans()) == 25
    # Not one detection line per forged packet: the excess is counted, not logged.
    assert len(syslog.find_all("TCP SYN/Normal scan from host")) < 100
