"""Stealth and advanced modes against real nmap scans, over IPv4 and IPv6."""

from __future__ import annotations

import re

import pytest

from tests.system.rig import Listener, Namespaces, SyslogReceiver, eventually, nmap, nmap_ports, run_in

ROUTE = "ip route add blackhole $TARGET$"
SCANS = {
    "-sS": "TCP SYN/Normal scan",
    "-sF": "TCP FIN scan",
    "-sN": "TCP NULL scan",
    "-sX": "TCP XMAS scan",
}
FAMILIES = ["ipv4", "ipv6"]


def addresses(net: Namespaces, family: str) -> tuple[list[str], str, str, str, str]:
    """nmap flags, target, scanner, second target address, second scanner for one family."""
    if family == "ipv4":
        return [], net.target_ip4, net.scanner_ip4, net.target2_ip4, net.scanner2_ip4
    return ["-6"], net.target_ip6, net.scanner_ip6, net.target2_ip6, net.scanner2_ip6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["-stcp", "-atcp"])
@pytest.mark.parametrize("scan", list(SCANS))
def test_tcp_stealth_scan_is_classified_and_blocked(daemon_factory, namespaces, syslog, mode, scan, family):
    net = namespaces
    flags, target, scanner, target2, _scanner2 = addresses(net, family)
    daemon_factory(mode, BLOCK_TCP="1", KILL_ROUTE=ROUTE)
    nmap(net.scanner, [*flags, scan, "-p", "1,111", "--max-retries", "0", target])
    kind = SCANS[scan]
    first = syslog.wait_for(re.compile(
        rf"^attackalert: {re.escape(kind)} from host: {re.escape(scanner)}/{re.escape(scanner)} "
        r"to TCP port: (1|111)$"))
    assert first is not None
    syslog.wait_for(f"attackalert: Host {scanner} has been blocked via dropped route")
    # Blocked: the follow-up SYN scan sees nothing answer, the second scanner still does.
    follow_up = nmap(net.scanner, [*flags, "-sS", "-p", "1,111", "--max-retries", "0", target])
    assert set(nmap_ports(follow_up.stdout).values()) == {"filtered"}, follow_up.stdout
    clean = nmap(net.scanner2, [*flags, "-sS", "-p", "1,111", "--max-retries", "0", target2])
    # Its first probe is answered; the second may meet the ban its first one set off (the
    # daemon watches the second scanner too: a loaded machine spaced nmap's two SYNs out).
    assert "closed" in nmap_ports(clean.stdout).values(), clean.stdout


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan", ["-sA", "-sW", "-sM"])
def test_ack_window_and_maimon_scans_are_not_1_2_hits(daemon_factory, namespaces, syslog, scan, family):
    net = namespaces
    flags, target, _scanner, _t2, _s2 = addresses(net, family)
    daemon_factory("-atcp", BLOCK_TCP="1", KILL_ROUTE=ROUTE)
    mark = syslog.mark()
    nmap(net.scanner, [*flags, scan, "-p", "1,25,111", "--max-retries", "0", target])
    syslog.assert_absent("attackalert:", wait=1.0, since=mark)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["-sudp", "-audp"])
def test_udp_scan_is_detected_and_blocked(daemon_factory, namespaces, syslog, mode, family):
    net = namespaces
    flags, target, scanner, _target2, _scanner2 = addresses(net, family)
    daemon = daemon_factory(mode, BLOCK_UDP="1", KILL_ROUTE=ROUTE, KILL_HOSTS_DENY="ALL: $TARGET$")
    nmap(net.scanner, [*flags, "-sU", "-p", "1,7,9", "--max-retries", "0", target])
    who = re.escape(scanner)
    syslog.wait_for(re.compile(rf"^attackalert: UDP scan from host: {who}/{who} to UDP port: (1|7|9)$"))
    syslog.wait_for(f"attackalert: Host {scanner} has been blocked via dropped route")
    entry = f"ALL: {scanner}" if family == "ipv4" else f"ALL: [{scanner}]"
    eventually(lambda: daemon.hosts_deny_text().splitlines() == [entry], what="hosts.deny line")
    eventually(lambda: daemon.history_text().rstrip().endswith("UDP Blocked"), what="history line")


@pytest.mark.parametrize("backend", ["none", "nftables"])  # AF_PACKET capture, NFLOG capture
def test_dns_reply_to_a_watched_port_is_not_a_hit(daemon_factory, namespaces, syslog, backend):
    net = namespaces
    daemon_factory("-audp", BLOCK_UDP="1", KILL_ROUTE=ROUTE, BAN_BACKEND=backend)
    mark = syslog.mark()
    # A resolver in the scanner namespace answers from port 53; the client on the target uses a
    # low source port inside the watched range, so only the live socket table keeps it quiet.
    with Listener(net.scanner, "udp", 53, banner=b"dns-answer"):
        client = (
            "import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind(('0.0.0.0', 999)); s.settimeout(3)\n"
            f"s.sendto(b'query', ('{net.scanner_ip4}', 53))\n"
            "print(s.recvfrom(100)[0].decode())\n"
        )
        result = run_in(net.target, ["python3", "-c", client], timeout=10)
        assert "dns-answer" in result.stdout, result.stderr
    syslog.assert_absent("attackalert:", wait=1.0, since=mark)


@pytest.mark.parametrize("family", FAMILIES)
def test_atcp_honours_a_listener_started_and_stopped_after_the_daemon(
    daemon_factory, namespaces, syslog: SyslogReceiver, family
):
    net = namespaces
    flags, target, scanner, _t2, _s2 = addresses(net, family)
    daemon_factory("-atcp", BLOCK_TCP="0")
    with Listener(net.target, "tcp", 80):
        # Give the listener table time to see it (it is re-read at most every 0.5 s).
        eventually(lambda: run_in(net.target, ["ss", "-ltn", "sport = :80"]).stdout.count(":80") > 0)
        mark = syslog.mark()
        nmap(net.scanner, [*flags, "-sS", "-p", "80", "--max-retries", "0", target])
        syslog.assert_absent("to TCP port: 80", wait=1.5, since=mark)
    mark = syslog.mark()
    nmap(net.scanner, [*flags, "-sS", "-p", "80", "--max-retries", "0", target])
    syslog.wait_for(f"attackalert: TCP SYN/Normal scan from host: {scanner}/{scanner} to TCP port: 80",
                    since=mark)


@pytest.mark.parametrize("backend", ["none", "nftables"])  # AF_PACKET capture, NFLOG capture
def test_a_busy_udp_service_does_not_wake_the_daemon(daemon_factory, namespaces, syslog, backend):
    from tests.system.test_nflog import IDLE_CPU, cpu_seconds

    net = namespaces
    with Listener(net.target, "udp", 514):
        daemon = daemon_factory("-audp", BAN_BACKEND=backend)
        run_in(net.target, ["sleep", "1.2"])  # the listener table refresh quiets the port
        before = cpu_seconds(daemon.pid)
        sender = (
            "import socket, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for n in range(3000):\n"
            f"    s.sendto(b'<13>syslog line %d' % n, ('{net.target_ip4}', 514))\n"
            "    time.sleep(0.0005)\n"
        )
        run_in(net.scanner, ["python3", "-c", sender], timeout=30)
        used = cpu_seconds(daemon.pid) - before
    assert used < IDLE_CPU * 2, f"the daemon used {used:.2f} s of CPU for a service's own traffic"
    syslog.assert_absent("attackalert:", wait=0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_ignored_source_never_reaches_the_daemon_until_it_leaves_the_list(
        daemon_factory, namespaces, syslog, family):
    """AF_PACKET capture (KILL_ROUTE, no nftables): the filter rejects the ignore list's sources
    in the kernel, so an ignored host's flood costs nothing; taking it off the list (no reload)
    lets its next probe through within the daemon's second."""
    import json
    import sys

    from tests.system.rig import daemon_env

    net = namespaces
    flags, target, scanner, _target2, scanner2 = addresses(net, family)
    prefix = "/24" if family == "ipv4" else "/64"
    daemon = daemon_factory("-stcp", BLOCK_TCP="1", KILL_ROUTE=ROUTE, BAN_BACKEND="none",
                            ignore=("127.0.0.1/32", scanner + prefix))

    def seen() -> int:
        argv = [sys.executable, "-m", "portsentry", "status", "--json", "-c", str(daemon.conf_path)]
        state = json.loads(run_in(net.target, argv, env=daemon_env(), check=True).stdout)
        return int(state["probes_seen"])

    for _ in range(3):
        nmap(net.scanner, [*flags, "-sS", "-p", "1,79,111", "--max-retries", "0", target])
    # The other scanner is seen: the capture works, only the ignored network is kept away.
    nmap(net.scanner2, [*flags, "-sS", "-p", "79", "--max-retries", "0", target])
    syslog.wait_for(f"attackalert: TCP SYN/Normal scan from host: {scanner2}/{scanner2} to TCP port: 79")
    assert seen() == 1  # 9 probes from the ignored network never reached the daemon
    daemon.ignore_path.write_text("127.0.0.1/32\n")
    run_in(net.target, ["sleep", "2.5"])  # the daemon re-reads the list within its second
    nmap(net.scanner, [*flags, "-sS", "-p", "111", "--max-retries", "0", target])
    syslog.wait_for(f"attackalert: TCP SYN/Normal scan from host: {scanner}/{scanner} to TCP port: 111")


def test_verbose_still_sees_ignored_sources(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon_factory("-stcp", BLOCK_TCP="1", KILL_ROUTE=ROUTE, BAN_BACKEND="none", verbose=True,
                   ignore=("127.0.0.1/32", net.scanner_ip4 + "/32"))
    nmap(net.scanner, ["-sS", "-p", "79", "--max-retries", "0", net.target_ip4])
    syslog.wait_for(re.compile(rf"{re.escape(net.scanner_ip4)}.*ignor", re.IGNORECASE))


def _bridge_target_link(ns: str) -> None:
    """Make the target's eth0 a port of a new bridge br0 that takes over eth0's addresses and,
    as a bridge does by default with one port, its MAC: a frame to br0 then passes the packet
    taps twice, first as eth0's, then as br0's, both times as addressed to this host."""
    import json

    link = json.loads(run_in(ns, ["ip", "-j", "link", "show", "eth0"], check=True).stdout)[0]
    addrs = json.loads(run_in(ns, ["ip", "-j", "addr", "show", "eth0", "scope", "global"],
                              check=True).stdout)[0]["addr_info"]
    addrs = [a for a in addrs if "local" in a]  # `ip -j` leaves filtered-out ones as {}
    for argv in (["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0"],
                 ["ip", "link", "set", "br0", "address", link["address"]],
                 ["ip", "addr", "flush", "dev", "eth0", "scope", "global"],
                 ["ip", "link", "set", "eth0", "master", "br0"],
                 *(["ip", "addr", "add", f"{a['local']}/{a['prefixlen']}", "dev", "br0",
                    *(["nodad"] if a["family"] == "inet6" else [])] for a in addrs),
                 ["ip", "link", "set", "br0", "up"]):
        run_in(ns, argv, check=True)
    eventually(lambda: '"forwarding"' in run_in(ns, ["bridge", "-j", "link", "show", "dev", "eth0"]).stdout,
               what="bridge port forwarding")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_probe_through_a_bridge_port_is_one_hit(daemon_factory, namespaces, syslog, family):
    """AF_PACKET capture on a host whose address is on a bridge (or bond) that shares its port's
    MAC: the kernel delivers the packet once, so it is one probe, not two (which made
    SCAN_TRIGGER="2" ban on a single SYN)."""
    import json
    import sys

    from tests.system.rig import daemon_env, tcp_connect

    net = namespaces
    _flags, target, scanner, _target2, _scanner2 = addresses(net, family)
    _bridge_target_link(net.target)
    daemon = daemon_factory("-stcp", BLOCK_TCP="1", KILL_ROUTE=ROUTE, BAN_BACKEND="none",
                            SCAN_TRIGGER="2")
    assert not tcp_connect(net.scanner, target, 1).connected  # one SYN, answered by a RST
    run_in(net.target, ["sleep", "1.5"])
    argv = [sys.executable, "-m", "portsentry", "status", "--json", "-c", str(daemon.conf_path)]
    state = json.loads(run_in(net.target, argv, env=daemon_env(), check=True).stdout)
    assert state["probes_seen"] == 1
    syslog.assert_absent(f"Host {scanner} has been blocked", wait=0.5)
