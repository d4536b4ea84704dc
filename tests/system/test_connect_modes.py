"""Connect modes (-tcp, -udp) against real scans between namespaces: what an admin would check."""

from __future__ import annotations

import re
import time

from tests.system.rig import eventually, nmap, nmap_ports, run_in, tcp_connect, udp_send

ROUTE = "ip route add blackhole $TARGET$"
FAIL2BAN = re.compile(r"^\d+ - .*\/(?P<host>[0-9a-fA-F.:]+) Port\: [0-9]+ (TCP|UDP) Blocked$")


def test_admin_scenario_connect_block_by_route_and_wrappers(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$", KILL_ROUTE=ROUTE)
    scanner = net.scanner_ip4

    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Connect from host: {scanner}/{scanner} to TCP port: 1")
    syslog.wait_for(f'attackalert: Host {scanner} has been blocked via wrappers with string: '
                    f'"ALL: {scanner}"')
    route = ROUTE.replace("$TARGET$", scanner)
    syslog.wait_for(f'attackalert: Host {scanner} has been blocked via dropped route using command: '
                    f'"{route}"')

    # The route really blocks: the scanner's next connect fails, the second scanner still gets in.
    assert not tcp_connect(net.scanner, net.target_ip4, 11, timeout=2).connected
    assert tcp_connect(net.scanner2, net.target2_ip4, 11).connected
    syslog.wait_for(f"attackalert: Connect from host: {net.scanner2_ip4}/{net.scanner2_ip4} to TCP port: 11")
    routes = run_in(net.target, ["ip", "route", "show", "type", "blackhole"]).stdout
    assert scanner in routes

    eventually(lambda: len(daemon.history_text().splitlines()) == 2, what="two history lines")
    assert daemon.hosts_deny_text().splitlines() == [f"ALL: {scanner}", f"ALL: {net.scanner2_ip4}"]
    history = daemon.history_text().splitlines()
    assert [FAIL2BAN.match(line)["host"] for line in history] == [scanner, net.scanner2_ip4]  # type: ignore[index]
    assert history[0].endswith(f"Host: {scanner}/{scanner} Port: 1 TCP Blocked")
    assert daemon.blocked_file("tcp").read_text().splitlines() == history


def test_already_blocked_and_no_duplicate_hosts_deny_lines(daemon_factory, namespaces, syslog):
    net = namespaces
    # hosts.deny alone does not stop our own sockets, so the scanner can come back.
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$")
    scanner = net.scanner_ip4
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for("has been blocked via wrappers")
    assert tcp_connect(net.scanner, net.target_ip4, 11).connected
    syslog.wait_for(f"attackalert: Host: {scanner} is already blocked. Ignoring")
    daemon.stop()
    # Unlike 1.2, a restart remembers the ban (ban store): still blocked, no second hosts.deny line.
    daemon.start()
    assert tcp_connect(net.scanner, net.target_ip4, 15).connected
    syslog.wait_count(f"attackalert: Host: {scanner} is already blocked. Ignoring", 2)
    assert syslog.find_all("has been blocked via wrappers") and len(
        syslog.find_all("has been blocked via wrappers")) == 1
    assert daemon.hosts_deny_text().splitlines() == [f"ALL: {scanner}"]


def test_nmap_connect_scan_is_detected_and_then_filtered(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon_factory("-tcp", BLOCK_TCP="1", KILL_ROUTE=ROUTE)
    nmap(net.scanner, ["-sT", "-p", "1,11,15,79,111", net.target_ip4])
    scanner = re.escape(net.scanner_ip4)
    syslog.wait_for(re.compile(rf"attackalert: Connect from host: {scanner}/.* to TCP port: "))
    syslog.wait_for("has been blocked via dropped route")
    follow_up = nmap(net.scanner, ["-sT", "-p", "1,11,15", "--max-retries", "0", net.target_ip4])
    assert set(nmap_ports(follow_up.stdout).values()) == {"filtered"}, follow_up.stdout
    clean = nmap(net.scanner2, ["-sT", "-p", "1,11,15", net.target2_ip4])
    # The second scanner sees open ports (and gets itself logged and blocked in turn).
    assert "open" in nmap_ports(clean.stdout).values(), clean.stdout


def test_ipv6_connect_is_detected_and_written_bracketed(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$", KILL_ROUTE=ROUTE)
    scanner = net.scanner_ip6
    assert tcp_connect(net.scanner, net.target_ip6, 1).connected
    syslog.wait_for(f"attackalert: Connect from host: {scanner}/{scanner} to TCP port: 1")
    syslog.wait_for(f'has been blocked via wrappers with string: "ALL: [{scanner}]"')
    syslog.wait_for("has been blocked via dropped route")
    assert not tcp_connect(net.scanner, net.target_ip6, 11, timeout=2).connected
    eventually(lambda: daemon.hosts_deny_text().splitlines() == [f"ALL: [{scanner}]"], what="hosts.deny")


def test_udp_datagram_is_a_hit_and_gets_the_banner(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-udp", BLOCK_UDP="1", KILL_HOSTS_DENY="ALL: $TARGET$", PORT_BANNER="go away")
    result = udp_send(net.scanner, net.target_ip4, 7, reply_timeout=3)
    assert result.reply == b"go away"
    syslog.wait_for(f"attackalert: Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to UDP port: 7")
    syslog.wait_for("has been blocked via wrappers")
    eventually(lambda: daemon.history_text().rstrip().endswith("Port: 7 UDP Blocked"), what="history")
    assert daemon.blocked_file("udp").exists()


def test_nmap_udp_scan_is_detected(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon_factory("-udp")
    nmap(net.scanner, ["-sU", "-p", "1,7,9", net.target_ip4])
    syslog.wait_for(re.compile(r"attackalert: Connect from host: .* to UDP port: (1|7|9)$"))
    syslog.wait_for("attackalert: Ignoring UDP response per configuration file setting.")


def test_tcp_banner_is_sent(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon_factory("-tcp", PORT_BANNER="** UNAUTHORIZED ACCESS PROHIBITED **")
    result = tcp_connect(net.scanner, net.target_ip4, 1)
    assert result.data == b"** UNAUTHORIZED ACCESS PROHIBITED **"


def test_ignored_scanner_produces_no_line_and_live_edit_of_ignore_file(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", ignore=("127.0.0.1/32", "198.18.0.0/24"), BLOCK_TCP="1",
                            KILL_HOSTS_DENY="ALL: $TARGET$")
    mark = syslog.mark()
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.assert_absent("attackalert:", wait=1.5, since=mark)
    # 1.2 re-read the ignore file on every event; an edit takes effect without a restart.
    daemon.ignore_path.write_text("127.0.0.1/32\n")
    time.sleep(1.2)
    assert tcp_connect(net.scanner, net.target_ip4, 11).connected
    syslog.wait_for(f"Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to TCP port: 11", since=mark)
    assert daemon.hosts_deny_text().splitlines() == [f"ALL: {net.scanner_ip4}"]


def test_verbose_says_why_an_ignored_host_is_not_blocked(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon_factory("-tcp", verbose=True, ignore=("198.18.0.2",))
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for(f"attackalert: Host: {net.scanner_ip4} found in ignore file, aborting actions")


def test_local_addresses_are_always_ignored(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon_factory("-tcp", verbose=True, ignore=(), BLOCK_TCP="1", KILL_ROUTE=ROUTE)
    assert run_in(net.target, ["python3", "-c",
                               f"import socket; socket.create_connection(('{net.target_ip4}', 1)).close()"]
                  ).returncode == 0
    syslog.wait_for(f"attackalert: Host: {net.target_ip4} found in ignore file, aborting actions")
    syslog.assert_absent("has been blocked", wait=1.0)


def test_scan_trigger_2_acts_on_the_second_hit(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", SCAN_TRIGGER="2", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$")
    mark = syslog.mark()
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.assert_absent("attackalert:", wait=1.0, since=mark)
    assert daemon.hosts_deny_text() == ""
    assert tcp_connect(net.scanner, net.target_ip4, 11).connected
    syslog.wait_for(f"Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to TCP port: 11")
    syslog.wait_for("has been blocked via wrappers")


def test_port_in_use_is_skipped_with_the_1_2_message(daemon_factory, namespaces, syslog):
    from tests.system.rig import Listener

    net = namespaces
    with Listener(net.target, "tcp", 11):
        daemon_factory("-tcp")
        syslog.wait_for("adminalert: ERROR: could not bind TCP socket: 11. Attempting to continue")
        syslog.wait_for("adminalert: Going into listen mode on TCP port: 15")


def test_failing_route_command_is_logged_as_a_failure(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", BLOCK_TCP="1", KILL_ROUTE="/bin/false $TARGET$")
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for("adminalert: ERROR: There was an error trying to block host (system fail) "
                    f"{net.scanner_ip4}")
    syslog.wait_for(f"attackalert: ERROR: Could not block host {net.scanner_ip4} !!")
    assert daemon.history_text() == ""


def test_kill_run_cmd_first_order(daemon_factory, namespaces, syslog, tmp_path):
    net = namespaces
    out = tmp_path / "order"
    daemon_factory("-tcp", BLOCK_TCP="1", KILL_RUN_CMD_FIRST="1",
                   KILL_HOSTS_DENY="ALL: $TARGET$",
                   KILL_ROUTE=f"echo route $TARGET$ >> {out}",
                   KILL_RUN_CMD=f"echo run $TARGET$ $PORT$ $MODE$ >> {out}")
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected
    syslog.wait_for("has been blocked via dropped route")
    lines = [r.message for r in syslog.records() if "attackalert: " in r.message]
    order = [i for i, m in enumerate(lines) if "External command" in m or "blocked via" in m]
    kinds = [("run" if "External" in lines[i] else "wrappers" if "wrappers" in lines[i] else "route")
             for i in order]
    assert kinds == ["run", "wrappers", "route"]
    assert out.read_text().splitlines() == [f"run {net.scanner_ip4} 1 tcp", f"route {net.scanner_ip4}"]


def test_shipped_two_family_iptables_kill_route_blocks_ipv4_and_ipv6(daemon_factory, namespaces, syslog):
    net = namespaces
    route = ("/sbin/iptables -I INPUT -s $TARGET$ -j DROP 2>/dev/null || "
             "/sbin/ip6tables -I INPUT -s $TARGET$ -j DROP")
    daemon_factory("-tcp", BLOCK_TCP="1", KILL_ROUTE=route)
    for target, scanner in ((net.target_ip4, net.scanner_ip4), (net.target_ip6, net.scanner_ip6)):
        assert tcp_connect(net.scanner, target, 1).connected
        syslog.wait_for(f"attackalert: Host {scanner} has been blocked via dropped route")
        assert not tcp_connect(net.scanner, target, 11, timeout=2).connected
