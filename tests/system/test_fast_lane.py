"""The fast lane (sensors/lane.c) seen as an admin sees it: real SYNs from the scanner namespace,
the daemon in the target with the AF_PACKET capture and the classic KILL_ROUTE path.

With the lane on, a lone SYN's detection line and KILL_ROUTE come from C and the daemon completes
the ban (hosts.deny, history, its record); everything an admin reads must be what the Python path
gives (FAST_LANE="off" runs the same case through Python where a comparison says more than a
fixed expectation). `status` says whether the lane is on, and its count of blocks begun shows
which path acted.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.rig import (
    Daemon,
    DaemonFactory,
    Listener,
    Namespaces,
    SyslogReceiver,
    cli_argv,
    daemon_env,
    eventually,
    nmap,
    nmap_ports,
    run_in,
    tcp_connect,
)

SPOOF = str(Path(__file__).with_name("spoof.py"))
ROUTE = "/sbin/ip route add blackhole $TARGET$"
UNDO = "/sbin/ip route del blackhole $TARGET$"
PORTS = "1,79,111"
LANE = {"TCP_PORTS": PORTS, "BLOCK_TCP": "1", "BAN_BACKEND": "none", "KILL_ROUTE": ROUTE,
        "KILL_HOSTS_DENY": "ALL: $TARGET$", "SCAN_TRIGGER": "0", "BLOCK_TIME": "0"}
FAMILIES = ["ipv4", "ipv6"]


def addresses(net: Namespaces, family: str) -> tuple[list[str], str, str]:
    """nmap's family flags, the target's address and the scanner's, for one family."""
    if family == "ipv4":
        return [], net.target_ip4, net.scanner_ip4
    return ["-6"], net.target_ip6, net.scanner_ip6


def started(factory: DaemonFactory, mode: str = "-stcp", **overrides: str | None) -> Daemon:
    make: Any = factory  # config keys as keyword arguments, beside start= and ignore=
    daemon: Daemon = make(mode, **{**LANE, **overrides})
    return daemon


def portsentry(daemon: Daemon, *args: str) -> str:
    result = run_in(daemon.net.target, cli_argv(daemon.conf_path, *args), env=daemon_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def lane_row(daemon: Daemon) -> str:
    """The `fast lane:` row of `portsentry status`."""
    rows = [line for line in portsentry(daemon, "status").splitlines() if line.startswith("fast lane:")]
    assert len(rows) == 1, rows
    return rows[0].removeprefix("fast lane:").strip()


def lane_blocks(daemon: Daemon) -> int:
    match = re.fullmatch(r"on \((\d+) blocks begun, (\d+) not taken up\)", lane_row(daemon))
    assert match is not None, lane_row(daemon)
    assert match[2] == "0"
    return int(match[1])


def banned(daemon: Daemon) -> list[str]:
    return [str(ban["address"]) for ban in json.loads(portsentry(daemon, "list", "--json"))]


def blackholes(net: Namespaces, family: str) -> str:
    return run_in(net.target, ["ip", *(["-6"] if family == "ipv6" else []), "route", "show",
                               "type", "blackhole"], check=True).stdout


def syn(net: Namespaces, family: str, port: int, ns: str | None = None) -> None:
    """Exactly one SYN (nmap, no retries) from the scanner (or `ns`) to the target."""
    flags, target, _scanner = addresses(net, family)
    nmap(ns or net.scanner, [*flags, "-sS", "-p", str(port), "--max-retries", "0", target],
         host_timeout="10s")


def detection(source: str, port: int) -> str:
    return f"attackalert: TCP SYN/Normal scan from host: {source}/{source} to TCP port: {port}"


def settle(syslog: SyslogReceiver, seconds: float = 1.5) -> None:
    """Time for a line or a ban that must not come: past the daemon's one-second tick."""
    syslog.assert_absent("\0never\0", wait=seconds)


# ---------------------------------------------------------------------------------------------
# A lone SYN, banned by the lane


@pytest.mark.parametrize("family", FAMILIES)
def test_one_syn_is_banned_with_1_2s_lines_route_hosts_deny_and_history(
        daemon_factory, namespaces, syslog, family):
    net = namespaces
    flags, target, scanner = addresses(net, family)
    daemon = started(daemon_factory)
    assert lane_row(daemon) == "on (0 blocks begun, 0 not taken up)"
    mark = syslog.mark()
    syn(net, family, 79)
    syslog.wait_for(f"attackalert: Host {scanner} has been blocked via dropped route", since=mark)
    eventually(lambda: scanner in daemon.history_text(), what="the history line")
    lines = [m for m in syslog.messages(mark) if m.startswith("attackalert:")]
    deny = f"ALL: {scanner}" if family == "ipv4" else f"ALL: [{scanner}]"  # tcp_wrappers' form
    assert lines == [
        detection(scanner, 79),
        f'attackalert: Host {scanner} has been blocked via wrappers with string: "{deny}"',
        f'attackalert: Host {scanner} has been blocked via dropped route using command: '
        f'"/sbin/ip route add blackhole {scanner}"',
    ], syslog.describe(mark)
    assert lane_blocks(daemon) == 1  # the lane began it, not the Python path
    assert f"blackhole {scanner} " in blackholes(net, family)
    assert daemon.hosts_deny_text().splitlines() == [deny]
    history = daemon.history_text().splitlines()
    assert len(history) == 1 and history[0].endswith(f"Host: {scanner}/{scanner} Port: 79 TCP Blocked")
    assert banned(daemon) == [scanner]
    assert f"{scanner} " in portsentry(daemon, "list")
    # A second SYN: the daemon knows the host (the lane hands it on).
    mark = syslog.mark()
    syn(net, family, 111)
    syslog.wait_for(f"attackalert: Host: {scanner}/{scanner} is already blocked Ignoring", since=mark)
    assert syslog.find_all("has been blocked via", since=mark) == []
    assert lane_blocks(daemon) == 1
    # Blocked for real: nothing answers any more.
    follow_up = nmap(net.scanner, [*flags, "-sS", "-p", PORTS, "--max-retries", "0", target])
    assert set(nmap_ports(follow_up.stdout).values()) == {"filtered"}, follow_up.stdout
    assert len(daemon.history_text().splitlines()) == 1
    assert (daemon.workdir / "state" / "lane-record").read_bytes().strip(b"\0") == b""  # every line freed


@pytest.mark.parametrize(("scan", "kind"), [("-sF", "TCP FIN scan"), ("-sN", "TCP NULL scan"),
                                          ("-sX", "TCP XMAS scan")])
@pytest.mark.parametrize("family", FAMILIES)
def test_fin_null_and_xmas_probes_are_banned_by_the_lane_with_1_2s_words(
        daemon_factory, namespaces, syslog, family, scan, kind):
    net = namespaces
    flags, target, scanner = addresses(net, family)
    daemon = started(daemon_factory)
    mark = syslog.mark()
    nmap(net.scanner, [*flags, scan, "-p", "79", "--max-retries", "0", target], host_timeout="10s")
    syslog.wait_for(f"attackalert: Host {scanner} has been blocked via dropped route", since=mark)
    lines = [m for m in syslog.messages(mark) if m.startswith("attackalert:")]
    assert lines[0] == f"attackalert: {kind} from host: {scanner}/{scanner} to TCP port: 79", lines
    assert len([line for line in lines if " from host: " in line]) == 1, lines
    assert lane_blocks(daemon) == 1  # the lane began it, not the Python path
    assert f"blackhole {scanner} " in blackholes(net, family)
    eventually(lambda: scanner in daemon.history_text(), what="the history line")
    assert [str(ban["address"]) for ban in json.loads(portsentry(daemon, "list", "--json"))] == [scanner]
    assert (daemon.workdir / "state" / "lane-record").read_bytes().strip(b"\0") == b""


# ---------------------------------------------------------------------------------------------
# What the lane must leave alone: the same outcome as the Python path


@pytest.mark.parametrize("fast_lane", ["auto", "off"])
@pytest.mark.parametrize("case", ["ignored", "own address", "listener", "unwatched"])
def test_sources_and_ports_the_lane_leaves_alone(daemon_factory, namespaces, syslog, case, fast_lane):
    """Nothing is said or banned, with the lane on as with the Python path."""
    net = namespaces
    ignore = ("127.0.0.1/32", f"{net.scanner_ip4}/32", f"{net.scanner_ip6}/128") if case == "ignored" \
        else ("127.0.0.1/32",)
    daemon = daemon_factory("-stcp", ignore=ignore, **{**LANE, "FAST_LANE": fast_lane})
    mark = syslog.mark()
    if case == "own address":
        assert not tcp_connect(net.target, net.target_ip4, 79).connected
        assert not tcp_connect(net.target, net.target2_ip6, 79).connected
    elif case == "listener":
        with Listener(net.target, "tcp", 111):
            time.sleep(1.5)  # the daemon's tick takes the live port out of the tables
            assert tcp_connect(net.scanner, net.target_ip4, 111).connected
            syn(net, "ipv6", 111)
    else:
        port = 79 if case == "ignored" else 2222
        syn(net, "ipv4", port)
        syn(net, "ipv6", port)
    settle(syslog)
    assert [m for m in syslog.messages(mark) if m.startswith("attackalert:")] == []
    assert banned(daemon) == []
    assert blackholes(net, "ipv4") == blackholes(net, "ipv6") == ""
    if fast_lane == "auto":
        assert lane_row(daemon) == "on (0 blocks begun, 0 not taken up)"


# ---------------------------------------------------------------------------------------------
# The ignore file


@pytest.mark.parametrize("family", FAMILIES)
def test_an_ignore_file_edit_counts_for_the_very_next_probe(daemon_factory, namespaces, syslog, family):
    net = namespaces
    _flags, _target, scanner = addresses(net, family)
    daemon = started(daemon_factory)
    assert lane_row(daemon).startswith("on ")
    with daemon.ignore_path.open("a") as handle:
        handle.write(f"{scanner}\n")
    mark = syslog.mark()
    syn(net, family, 79)
    settle(syslog)
    assert [m for m in syslog.messages(mark) if m.startswith("attackalert:")] == []
    assert banned(daemon) == []
    assert lane_blocks(daemon) == 0


# ---------------------------------------------------------------------------------------------
# Off, and why


def test_fast_lane_off_says_so_and_python_still_bans(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = started(daemon_factory, FAST_LANE="off")
    assert lane_row(daemon) == 'off: FAST_LANE="off"'
    syn(net, "ipv4", 79)
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via dropped route")
    assert banned(daemon) == [net.scanner_ip4]
    assert f"blackhole {net.scanner_ip4} " in blackholes(net, "ipv4")
    eventually(lambda: net.scanner_ip4 in daemon.history_text(), what="the history line")
    assert daemon.hosts_deny_text().splitlines() == [f"ALL: {net.scanner_ip4}"]


# The daemon as installed where no C compiler was found: the package without its compiled lane.
NO_LIBRARY = (sys.executable, "-c", "import sys; import portsentry.sensors.lane as lane; "
              "lane.library_path = lambda: None; from portsentry.cli.main import main; "
              "sys.argv[0] = 'portsentry'; raise SystemExit(main())")


def test_status_says_the_compiled_lane_is_missing(namespaces, syslog, tmp_path):
    """README: where no compiler was found, every probe goes through Python and `status` says
    so. It said "no TCP stealth mode with the AF_PACKET capture" beside a -stcp on AF_PACKET."""
    net = namespaces
    daemon = Daemon(net, tmp_path / "daemon", syslog, ("-stcp",), command=NO_LIBRARY, config=LANE)
    try:
        daemon.start()
        assert lane_row(daemon) == ("off: the compiled fast lane is not installed (no C compiler when "
                                    "the package was built)")
        syn(net, "ipv4", 79)
        syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via dropped route")
        assert banned(daemon) == [net.scanner_ip4]
    finally:
        daemon.stop()


@pytest.mark.parametrize(("overrides", "why"), [
    ({"RESOLVE_HOST": "1"}, "RESOLVE_HOST looks up names for the lines"),
    ({"KILL_RUN_CMD_FIRST": "1", "KILL_RUN_CMD": "/bin/true $TARGET$"},
     "KILL_RUN_CMD_FIRST runs a command before the block"),
    ({"SCAN_TRIGGER": "2"}, "SCAN_TRIGGER is above 1"),
    ({"BLOCK_TCP": "0"}, "BLOCK_TCP is not 1"),
], ids=["RESOLVE_HOST", "KILL_RUN_CMD_FIRST", "SCAN_TRIGGER", "BLOCK_TCP"])
def test_configurations_that_keep_the_lane_off(daemon_factory, namespaces, syslog, overrides, why):
    net = namespaces
    daemon = started(daemon_factory, **overrides)
    assert lane_row(daemon) == f"off: {why}"
    # Python decides: with SCAN_TRIGGER 2 the second probe blocks, with BLOCK_TCP 0 none does.
    mark = syslog.mark()
    syn(net, "ipv4", 79)
    syn(net, "ipv4", 111)
    syslog.wait_for(detection(net.scanner_ip4, 111), since=mark)
    settle(syslog)
    if overrides.get("BLOCK_TCP") == "0":
        assert banned(daemon) == []
    else:
        assert banned(daemon) == [net.scanner_ip4]
        assert len(syslog.find_all("has been blocked via dropped route", since=mark)) == 1
    assert lane_row(daemon) == f"off: {why}"


# ---------------------------------------------------------------------------------------------
# The ban rate cap


def _mac_of(ns: str, dev: str) -> str:
    out = run_in(ns, ["ip", "-j", "link", "show", dev], check=True).stdout
    return str(json.loads(out)[0]["address"])


@pytest.mark.parametrize("fast_lane", ["auto", "off"])
def test_the_rate_cap_holds_with_the_lanes_share(daemon_factory, namespaces, syslog, fast_lane):
    net = namespaces
    daemon = started(daemon_factory, BAN_RATE_LIMIT="2", FAST_LANE=fast_lane)
    sources = [f"198.18.0.{n}" for n in range(20, 25)]
    mark = syslog.mark()
    sent = run_in(net.scanner, [sys.executable, SPOOF, "frame", "eth0", _mac_of(net.target, "eth0"),
                                net.target_ip4, "79", *sources], timeout=20)
    assert sent.stdout.strip() == "5", sent.stderr
    syslog.wait_count("has been blocked via dropped route", 2, since=mark)
    settle(syslog)
    assert len(banned(daemon)) == 2
    routes = syslog.find_all("has been blocked via dropped route", since=mark)
    assert len(routes) == 2
    # As the Python path refuses: the first refused hit said with the cap's line, the rest
    # counted quietly (the minute's summary says how many).
    assert syslog.find_all("attackalert: TCP SYN/Normal scan", since=mark) == \
        [syslog.find(detection(source, 79), since=mark) for source in sources[:3]]
    assert len(syslog.find_all("ban rate limit reached (2 new bans per minute)", since=mark)) == 1
    assert len(blackholes(net, "ipv4").splitlines()) == 2
    assert len(daemon.hosts_deny_text().splitlines()) == 2
    if fast_lane == "auto":
        assert lane_blocks(daemon) == 2


def test_a_connect_mode_ban_and_a_lane_ban_share_one_rate_cap(daemon_factory, namespaces, syslog):
    # -tcp beside -atcp with BAN_RATE_LIMIT=1: the scanner completes a connection to the -tcp
    # port (a connect-mode ban, made by Python), then a forged SYN from another source reaches
    # a port only -atcp watches, before the daemon's next tick. One ban in the minute, not two.
    net = namespaces
    daemon = daemon_factory("-tcp", "-atcp", **{**LANE, "TCP_PORTS": "79", "BAN_RATE_LIMIT": "1"})
    assert lane_row(daemon).startswith("on")
    mark = syslog.mark()
    assert tcp_connect(net.scanner, net.target_ip4, 79, timeout=0.5).connected
    sent = run_in(net.scanner, [sys.executable, SPOOF, "frame", "eth0", _mac_of(net.target, "eth0"),
                                net.target_ip4, "80", "198.18.0.30"], timeout=20)
    assert sent.stdout.strip() == "1", sent.stderr
    syslog.wait_for("has been blocked via dropped route", since=mark)
    settle(syslog, 2.5)
    assert banned(daemon) == [net.scanner_ip4]
    assert len(syslog.find_all("has been blocked via dropped route", since=mark)) == 1
    assert syslog.find("ban rate limit reached (1 new bans per minute)", since=mark)
    assert len(blackholes(net, "ipv4").splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# A record the last run did not take in


def test_a_lane_record_left_by_a_stopped_daemon_is_recorded_at_start(daemon_factory, namespaces, syslog):
    net = namespaces
    daemon = started(daemon_factory)
    daemon.stop()
    record = daemon.workdir / "state" / "lane-record"
    at = time.time() - 5
    record.write_text(f"7 {at:.6f} 198.18.0.77 79 stcp\n")
    mark = syslog.mark()
    daemon.start()
    syslog.wait_for("adminalert: Host 198.18.0.77 was blocked by the fast lane and not recorded before "
                    "the daemon stopped: recorded now", since=mark)
    assert banned(daemon) == ["198.18.0.77"]
    assert record.read_bytes().strip(b"\0") == b""
    assert "ALL: 198.18.0.77" in daemon.hosts_deny_text()
    assert "Host: 198.18.0.77/198.18.0.77 Port: 79 TCP Blocked" in daemon.history_text()
    assert lane_row(daemon) == "on (0 blocks begun, 0 not taken up)"
    # The lane does not act again for the host the daemon now holds.
    mark = syslog.mark()
    run_in(net.scanner, [sys.executable, SPOOF, "frame", "eth0", _mac_of(net.target, "eth0"),
                         net.target_ip4, "111", "198.18.0.77"], timeout=20)
    syslog.wait_for("attackalert: Host: 198.18.0.77/198.18.0.77 is already blocked Ignoring", since=mark)
    assert lane_row(daemon) == "on (0 blocks begun, 0 not taken up)"


# ---------------------------------------------------------------------------------------------
# Unblock


@pytest.mark.parametrize("family", FAMILIES)
def test_unblock_of_a_lane_ban_undoes_the_route_and_the_next_syn_bans_again(
        daemon_factory, namespaces, syslog, family):
    net = namespaces
    _flags, _target, scanner = addresses(net, family)
    daemon = started(daemon_factory, KILL_ROUTE_UNDO=UNDO)
    syn(net, family, 79)
    syslog.wait_for(f"attackalert: Host {scanner} has been blocked via dropped route")
    assert f"blackhole {scanner} " in blackholes(net, family)
    assert lane_blocks(daemon) == 1
    out = portsentry(daemon, "unblock", scanner)
    assert f"unblock: {scanner} done" in out, out
    syslog.wait_for(f"attackalert: Host {scanner} has been unblocked: unblocked by admin")
    eventually(lambda: f"blackhole {scanner} " not in blackholes(net, family), what="route removed")
    assert banned(daemon) == []
    assert daemon.hosts_deny_text() == ""
    mark = syslog.mark()
    syn(net, family, 111)
    syslog.wait_for(f"attackalert: Host {scanner} has been blocked via dropped route", since=mark)
    assert syslog.find(detection(scanner, 111), since=mark) is not None
    assert f"blackhole {scanner} " in blackholes(net, family)
    assert banned(daemon) == [scanner]
    assert lane_blocks(daemon) == 2


def _one_ban_records(factory: DaemonFactory, net: Namespaces, syslog: SyslogReceiver, fast_lane: str,
                     workdir: Path) -> dict[str, object]:
    ran, events = workdir / "ran", workdir / "events.jsonl"
    ran.unlink(missing_ok=True)
    events.unlink(missing_ok=True)
    daemon = started(factory, FAST_LANE=fast_lane, KILL_RUN_CMD=f"echo $TARGET$ $PORT$ $MODE$ >> {ran}",
                     EVENT_LOG=str(events))
    mark = syslog.mark()
    syn(net, "ipv4", 79)
    eventually(lambda: ran.exists() and daemon.history_text(), what="KILL_RUN_CMD and history")
    settle(syslog)
    blocked = daemon.blocked_file("stcp")
    fields = ("event", "src", "port", "mode", "kind", "backend", "action", "reason")
    records: dict[str, object] = {
        "syslog": [m for m in syslog.messages(mark) if "attackalert" in m],
        "ran": ran.read_text(),
        "history": [line.split(" ", 1)[1].split(" ", 3)[3] for line in daemon.history_text().splitlines()],
        "blocked": [line.split(" ", 1)[1].split(" ", 3)[3] for line in
                    (blocked.read_text().splitlines() if blocked.exists() else [])],
        "events": [{k: v for k, v in json.loads(line).items() if k in fields}
                   for line in events.read_text().splitlines()] if events.exists() else [],
        "list": [(ban["address"], ban.get("mode"), ban.get("port"))
                 for ban in json.loads(portsentry(daemon, "list", "--json"))],
    }
    daemon.stop()
    return records


def test_a_lane_ban_leaves_the_records_the_python_path_leaves(daemon_factory, namespaces, syslog, tmp_path):
    net = namespaces
    python = _one_ban_records(daemon_factory, net, syslog, "off", tmp_path)
    # The same daemon's files again, from an empty start, with the lane on.
    run_in(net.target, ["ip", "route", "del", "blackhole", net.scanner_ip4], check=True)
    lane = _one_ban_records(daemon_factory, net, syslog, "auto", tmp_path)
    assert python["events"] and python["blocked"] and python["ran"] == f"{net.scanner_ip4} 79 stcp\n"
    assert lane == python, (lane, python)


# ---------------------------------------------------------------------------------------------
# Forged sources


def test_forged_sources_never_get_a_lane_ban(daemon_factory, namespaces, syslog):
    """The lane's deny table holds what the sensor and the guard spare: impossible sources, the
    gateway (also hidden in IPv6), this host's own addresses and its subnet broadcast."""
    net = namespaces
    gateway = "198.18.0.254"
    run_in(net.scanner, ["ip", "addr", "add", f"{gateway}/24", "dev", "eth0"], check=True)
    run_in(net.target, ["ip", "route", "add", "default", "via", gateway], check=True)
    daemon = started(daemon_factory)
    mac = _mac_of(net.target, "eth0")
    forged = {
        net.target_ip4: ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "198.18.0.255",
                         "240.0.0.1", gateway, net.target_ip4, net.target2_ip4],
        net.target_ip6: ["::", "::1", "ff02::1", f"::ffff:{gateway}", f"::{gateway}",
                         f"::ffff:{net.scanner2_ip4}", net.target_ip6, net.target2_ip6],
    }
    for destination, sources in forged.items():
        sent = run_in(net.scanner, [sys.executable, SPOOF, "frame", "eth0", mac, destination, "79",
                                    *sources], timeout=20)
        assert sent.stdout.strip() == str(len(sources)), sent.stderr
    # A real probe afterwards: once it is banned, the forged ones before it were read too.
    syn(net, "ipv4", 79)
    syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via dropped route")
    settle(syslog)
    assert banned(daemon) == [net.scanner_ip4]
    assert blackholes(net, "ipv4").split() == ["blackhole", net.scanner_ip4]
    assert blackholes(net, "ipv6") == ""
    assert lane_blocks(daemon) == 1
