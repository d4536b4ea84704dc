"""Evidence as 1.2 writes it: an ordinary scan is logged line for line, only floods are summed up,
and an ignore-file edit counts for the very next packet (issue 9.6, 9.7).

The daemons run with a 1.2 configuration (1.2's keys only, besides the file locations the rig
keeps in a temp dir), so LOG_REPEAT_LIMIT has its default.
"""

from __future__ import annotations

import re

import pytest

from tests.system.rig import eventually, nmap, tcp_connect

ROUTE = "ip route add blackhole $TARGET$"
PORTS = [1, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 37, 42, 43, 49]  # 15 ports, no service on any


def lines_for(syslog, pattern: str) -> list[str]:
    return [m for m in syslog.messages() if re.search(pattern, m)]


@pytest.mark.parametrize("block", ["1", "0"])
def test_a_fin_scan_of_15_ports_gives_15_detection_lines(daemon_factory, namespaces, syslog, block):
    net = namespaces
    daemon_factory("-atcp", BLOCK_TCP=block, KILL_ROUTE=ROUTE)
    nmap(net.scanner, ["-sF", "-p", ",".join(map(str, PORTS)), "--max-retries", "0", net.target_ip4])
    detection = rf"^attackalert: TCP FIN scan from host: {re.escape(net.scanner_ip4)}/"
    eventually(lambda: len(lines_for(syslog, detection)) == 15, timeout=10,
               what=f"15 detection lines; got:\n{syslog.describe()}")
    ports = {int(m.rsplit(" ", 1)[1]) for m in lines_for(syslog, detection)}
    assert ports == set(PORTS)
    # Both of 1.2's lines per hit: after the first, each later hit says the host is blocked. The
    # last hit's second line may reach the receiver a moment after its detection line.
    repeat = rf"Host: {re.escape(net.scanner_ip4)}/\S+ is already blocked"
    eventually(lambda: len(lines_for(syslog, repeat)) >= 14, timeout=10,
               what=f"14 'already blocked' lines; got:\n{syslog.describe()}")
    assert len(lines_for(syslog, repeat)) == 14
    assert not lines_for(syslog, "not logged")  # nothing summed up: this is no flood


def test_seven_bait_ports_of_tcp_give_seven_lines(daemon_factory, namespaces, syslog):
    net = namespaces
    bait = [1, 11, 15, 79, 111, 119, 143]
    daemon_factory("-tcp", TCP_PORTS=",".join(map(str, bait)), BLOCK_TCP="1",
                   KILL_HOSTS_DENY="ALL: $TARGET$")
    for port in bait:
        assert tcp_connect(net.scanner, net.target_ip4, port).connected
    detection = rf"^attackalert: Connect from host: {re.escape(net.scanner_ip4)}/"
    eventually(lambda: len(lines_for(syslog, detection)) == 7, timeout=10,
               what=f"7 connect lines; got:\n{syslog.describe()}")


def test_a_flood_is_summed_up_when_its_window_ends_and_at_shutdown(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-atcp", BLOCK_TCP="1", KILL_ROUTE=ROUTE, LOG_REPEAT_LIMIT="3",
                            LOG_REPEAT_WINDOW="2")
    nmap(net.scanner, ["-sF", "-p", ",".join(map(str, PORTS[:10])), "--max-retries", "0", net.target_ip4])
    # No further hit from the host: the summary comes when the 2 s window ends.
    summary = syslog.wait_for(re.compile(
        rf"^attackalert: Host: {re.escape(net.scanner_ip4)}/\S+ is already blocked: 6 more TCP hits "
        r"in 2 seconds not logged"), timeout=10)
    assert summary is not None
    mark = syslog.mark()
    nmap(net.scanner, ["-sF", "-p", ",".join(map(str, PORTS[10:])), "--max-retries", "0", net.target_ip4])
    eventually(lambda: len(lines_for(syslog, "is already blocked Ignoring$")) >= 3 + 3, timeout=10,
               what="3 more repeat lines")
    daemon.stop()
    # Stopped inside the window: its summary is written at shutdown, not lost.
    assert any("more TCP hits in 2 seconds not logged" in m for m in syslog.messages(mark)), \
        syslog.describe(mark)


def test_an_ignore_file_edit_counts_for_the_very_next_packet(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = daemon_factory("-tcp", TCP_PORTS="1", BLOCK_TCP="1", KILL_HOSTS_DENY="ALL: $TARGET$")
    with daemon.ignore_path.open("a") as ignore:
        ignore.write(f"{net.scanner_ip4}\n")
    assert tcp_connect(net.scanner, net.target_ip4, 1).connected  # at once: within milliseconds
    syslog.assert_absent("has been blocked", wait=1.5)
    assert daemon.hosts_deny_text() == ""
