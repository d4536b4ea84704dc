"""Forged sources never become bans, on either capture path (issue 9.1).

Each forged SYN goes out of the scanner as a whole Ethernet frame (tests/system/spoof.py frame),
so its source reaches the target as written: the unspecified, loopback, multicast, broadcast
and reserved addresses of both families, the target's own subnet broadcast, and the default
gateway hidden inside IPv6 as ::ffff:a.b.c.d and ::a.b.c.d (no IPv4 host sends IPv6: forged too).
The AF_PACKET capture sees such frames before the kernel's routing drops martians; NFLOG sees what
routing lets through.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.rig import cli_argv, daemon_env, eventually, run_in, tcp_connect

SPOOF = str(Path(__file__).with_name("spoof.py"))
GATEWAY = "198.18.0.254"
FORGED4 = ["0.0.0.0", "0.9.9.9", "127.0.0.1", "224.0.0.1", "255.255.255.255", "198.18.0.255",
           "240.0.0.1"]
FORGED6 = ["::", "::1", "ff02::1", f"::ffff:{GATEWAY}", f"::{GATEWAY}"]


def mac_of(ns: str, dev: str) -> str:
    out = run_in(ns, ["ip", "-j", "link", "show", dev], check=True).stdout
    return str(json.loads(out)[0]["address"])


def portsentry(ns: str, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(ns, cli_argv(conf, *args), env=daemon_env())


@pytest.mark.parametrize("capture", ["packet", "nflog"])
def test_forged_sources_are_dropped_and_never_banned(daemon_factory, namespaces, syslog, capture):
    net = namespaces
    run_in(net.scanner, ["ip", "addr", "add", f"{GATEWAY}/24", "dev", "eth0"], check=True)
    run_in(net.target, ["ip", "route", "add", "default", "via", GATEWAY], check=True)
    daemon = daemon_factory("-stcp", BLOCK_TCP="1", BAN_BACKEND="nftables", CAPTURE=capture,
                            TCP_PORTS="1")
    mac = mac_of(net.target, "eth0")
    for destination, sources in ((net.target_ip4, FORGED4), (net.target_ip6, FORGED6)):
        sent = run_in(net.scanner, [sys.executable, SPOOF, "frame", "eth0", mac, destination, "1",
                                    *sources], timeout=20)
        assert sent.stdout.strip() == str(len(sources)), sent.stderr
    if capture == "packet":
        def dropped() -> dict[str, int]:
            status = json.loads(portsentry(net.target, daemon.conf_path, "status", "--json").stdout)
            return dict(status["packets_dropped"])

        eventually(lambda: sum(v for k, v in dropped().items() if k.startswith("source ")) >= 10,
                   what="forged sources counted as dropped")
        counts = dropped()
        assert counts["source unspecified"] >= 3 and counts["source loopback"] >= 2
        assert counts["source multicast"] >= 2 and counts["source broadcast"] >= 2
        assert counts["source reserved"] >= 1
        assert counts["source IPv4 in IPv6"] >= 2  # the gateway, mapped and compatible
    # A real scanner is blocked, so the daemon was reading; none of the forged sources was.
    run_in(net.scanner, ["hping3", "-q", "-S", "-p", "1", "-c", "1", net.target_ip4], timeout=10)
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")
    bans = json.loads(portsentry(net.target, daemon.conf_path, "list", "--json").stdout)
    assert [ban["address"] for ban in bans] == [net.scanner_ip4]
    for set_name in ("blocked4", "blocked6"):
        listing = run_in(net.target, ["nft", "-j", "list", "set", "inet", "portsentry", set_name],
                         check=True).stdout
        elements = [item for entry in json.loads(listing)["nftables"] if "set" in entry
                    for item in entry["set"].get("elem", [])]
        expected = [net.scanner_ip4] if set_name == "blocked4" else []
        assert [e["elem"]["val"] if isinstance(e, dict) else e for e in elements] == expected, listing
    assert "has been blocked" not in "\n".join(
        m for m in syslog.messages() if net.scanner_ip4 not in m)


def test_a_forged_datagram_from_our_own_address_makes_no_probe_a_reply(daemon_factory, namespaces, syslog):
    # The AF_PACKET capture remembers our own outgoing UDP so that replies to it are no probes.
    # A frame from the same link with our address as its source, "to" the scanner, looked like
    # such a datagram (its port below the highest watched, as the filter wants): the scanner's
    # probe from that port to ours was then taken for a reply. Verbose, because otherwise the
    # filter keeps the ignore list's sources away, and our own addresses are on that list.
    net = namespaces
    daemon_factory("-sudp", verbose=True, BLOCK_UDP="1", BAN_BACKEND="nftables", CAPTURE="packet",
                   UDP_PORTS="31337")
    sent = run_in(net.scanner, [sys.executable, SPOOF, "udpframe", "eth0", mac_of(net.target, "eth0"),
                                net.target_ip4, net.scanner_ip4, "31337", "30999"], timeout=20)
    assert sent.stdout.strip() == "1", sent.stderr
    # The same capture queue carries both frames in order: the forged one is read first.
    probe = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             "s.bind(('', 30999)); s.sendto(b'', (sys.argv[1], 31337))")
    run_in(net.scanner, [sys.executable, "-c", probe, net.target_ip4], check=True, timeout=10)
    who = net.scanner_ip4
    syslog.wait_for(f"attackalert: UDP scan from host: {who}/{who} to UDP port: 31337")
    syslog.wait_for(f"attackalert: Host {who} has been blocked via nftables")


@pytest.mark.parametrize("capture", ["packet", "nflog"])
def test_an_ipv4_host_forged_inside_ipv6_is_not_banned(daemon_factory, namespaces, syslog, capture):
    # The target's strict reverse-path filter drops an IPv4 SYN "from" the second scanner that
    # comes in on the first one's link (NFLOG sees what it lets through; AF_PACKET sees it before
    # routing, so there it is sent only inside IPv6). The same source written ::ffff:198.18.1.2 in
    # an IPv6 header passed the filter, and the daemon banned the second scanner's IPv4 address.
    net = namespaces
    for key in ("all", "default", "eth0", "eth1"):
        run_in(net.target, ["sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=1"], check=True)
    daemon_factory("-stcp", BLOCK_TCP="1", BAN_BACKEND="nftables", CAPTURE=capture, TCP_PORTS="1")
    mac = mac_of(net.target, "eth0")
    victim = net.scanner2_ip4
    forged = [(net.target_ip6, f"::ffff:{victim}"), (net.target_ip6, f"::{victim}")]
    if capture == "nflog":
        forged.insert(0, (net.target_ip4, victim))
    for destination, source in forged:
        sent = run_in(net.scanner, [sys.executable, SPOOF, "frame", "eth0", mac, destination, "1",
                                    source], timeout=20)
        assert sent.stdout.strip() == "1", sent.stderr
    # A real probe afterwards: once it is seen, the forged ones before it were read too.
    run_in(net.scanner, ["hping3", "-q", "-S", "-p", "1", "-c", "1", net.target_ip4], timeout=10)
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")
    assert victim not in "\n".join(syslog.messages())
    # Not banned: an unwatched closed port answers it with a reset.
    assert tcp_connect(net.scanner2, net.target2_ip4, 2, timeout=3).error.startswith("ConnectionRefused")
