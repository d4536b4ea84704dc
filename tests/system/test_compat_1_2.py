"""Differential: Debian's PortSentry 1.2 and ours, same /etc/portsentry/portsentry.conf, same
traffic, per mode; what an admin and fail2ban read must agree.

Compared: syslog lines (the text after `portsentry[pid]: `, in order; facility, severity and
ident), the history file, the blocked.<mode> files, hosts.deny and the commands KILL_ROUTE /
KILL_RUN_CMD ran with their substitutions, plus what the scanner got back (PORT_BANNER).

Differences that are allowed are applied to 1.2's outcome, each by a function below naming the
place in the documentation that says so; anything else fails the test with both outcomes shown.
Each case runs each daemon in fresh namespaces (tests/system/twin.py), one after the other.
"""

from __future__ import annotations

import difflib
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from tests.system.rig import (
    Listener,
    Namespaces,
    RigError,
    SyslogReceiver,
    namespaces_up,
    nmap,
    short_socket_dir,
    tcp_connect,
    udp_send,
)
from tests.system.twin import Legacy, Ours, Outcome, Side, config_text, hping, record_command, settle

if shutil.which("hping3") is None or shutil.which("nmap") is None:
    pytest.skip("needs nmap and hping3 (scripts/setup installs them)", allow_module_level=True)

SCANNER, SCANNER2 = "198.18.0.2", "198.18.1.2"
TARGET, TARGET2 = "198.18.0.1", "198.18.1.1"
BANNER = "** UNAUTHORIZED ACCESS PROHIBITED **"
HOSTS = f"127.0.0.1 localhost\n{SCANNER} scanner.example.test\n"
# A resolver nobody answers at once (ICMP port unreachable): a lookup without /etc/hosts entry
# fails fast in both daemons instead of waiting for the host's resolver.
RESOLV = "nameserver 127.0.0.1\n"
SHUTDOWN = ("securityalert: PortSentry is shutting down", "adminalert: PortSentry is shutting down")
READY = "adminalert: PortSentry is now active and listening."

Traffic = Callable[[Namespaces, Side], None]
Documented = Callable[[Outcome], Outcome]


@dataclass(frozen=True)
class Case:
    name: str
    modes: tuple[str, ...]
    settings: dict[str, str]
    traffic: Traffic
    ignore: tuple[str, ...] = ("127.0.0.1/32", "0.0.0.0", f"{SCANNER2} # the second scanner")
    listeners: tuple[tuple[str, int], ...] = ()
    etc: dict[str, str] = field(default_factory=dict)
    documented: tuple[Documented, ...] = ()


# ---------------------------------------------------------------------------------------------
# Documented differences, applied to 1.2's outcome


def _syslog(outcome: Outcome, change: Callable[[list[str]], list[str]]) -> Outcome:
    return replace(outcome, syslog=tuple(change(list(outcome.syslog))))


def null_scan_one_space(legacy: Outcome) -> Outcome:
    """README, Compatibility: `attackalert:  TCP NULL scan` (two spaces, a bug) -> one space."""
    return _syslog(legacy, lambda lines: [x.replace("attackalert:  TCP NULL", "attackalert: TCP NULL")
                                          for x in lines])


def host_bits_warning(legacy: Outcome) -> Outcome:
    """README, Configuration: `192.168.1.5/24` means the whole /24, as in 1.2, and a warning at
    start says so."""
    warning = ("adminalert: WARNING: /etc/portsentry/portsentry.ignore:3: '198.18.1.77/24' has host "
               "bits set: it means all of 198.18.1.0/24 (write 198.18.1.0/24 if that is meant)")
    return _syslog(legacy, lambda lines: [lines[0], warning, *lines[1:]])


def udp_banner_once(legacy: Outcome) -> Outcome:
    """portsentry.conf(5), PORT_BANNER: a UDP source gets the banner once, not again while it is
    blocked (1.2 answered every datagram: a reflector)."""
    replies, seen = [], False
    for reply in legacy.replies:
        if reply.startswith("udp reply"):
            reply = "udp no reply" if seen else reply
            seen = True
        replies.append(reply)
    return replace(legacy, replies=tuple(replies))


def blocked_once(legacy: Outcome) -> Outcome:
    """README, Compatibility: a host stays blocked until it is unblocked. Several modes in one
    process share their bans (1.2 ran a process per mode, and each blocked the host again), and
    the blocked files are a record only (1.2 re-read them at every hit, so deleting a host's
    line blocked it again). So where 1.2 blocked a host a second time, ours says it is already
    blocked: no second round of commands, history line or hosts.deny line. For cases where every
    record is a block (BLOCK_x=1)."""
    detection = re.compile(r"^attackalert: (?P<kind>.*) from host: (?P<name>\S+)/(?P<ip>\S+) "
                           r"to (TCP|UDP) port: \d+$")
    blocked: set[str] = set()
    lines: list[str] = []
    current: re.Match[str] | None = None
    repeat = said = False
    for line in legacy.syslog:
        m = detection.match(line)
        if m:
            current, repeat, said = m, m["ip"] in blocked, False
            lines.append(line)
            continue
        acted = "has been blocked via" in line or "External command run" in line
        if current is not None and acted and not repeat:
            blocked.add(current["ip"])
        if current is not None and repeat and (acted or "is already blocked" in line):
            # In place of 1.2's second round of actions, after any IP options line.
            if not said:
                lines.append(f"attackalert: Host: {current['ip']} is already blocked. Ignoring"
                             if current["kind"] == "Connect" else
                             f"attackalert: Host: {current['name']}/{current['ip']} is already blocked "
                             "Ignoring")
                said = True
            continue
        lines.append(line)

    def host_of(row: str) -> str:
        return row.split("Host: ", 1)[1].split("/", 1)[1].split(" ", 1)[0]

    first: dict[str, str] = {}
    for row in legacy.history:
        first.setdefault(host_of(row), row)
    commands: dict[str, tuple[str, str]] = {}
    for command in legacy.commands:
        _word, host, port, mode = command.split()
        commands.setdefault(host, (port, mode))
    blocked_rows = {mode: tuple(r for r in rows if first[host_of(r)] == r)
                    for mode, rows in legacy.blocked.items()}
    return replace(
        legacy, syslog=tuple(lines), history=tuple(first.values()), blocked=blocked_rows,
        hosts_deny=tuple(dict.fromkeys(legacy.hosts_deny)),
        commands=tuple(c for c in legacy.commands if tuple(c.split()[2:]) == commands[c.split()[1]]))


# ---------------------------------------------------------------------------------------------
# Comparing


def sections(outcome: Outcome) -> tuple[list[str], list[str], list[str]]:
    """(start-up lines, events in order, shutdown lines). Start-up is everything up to the last
    readiness line; the version in the first line is not compared (ours is not 1.2)."""
    lines = list(outcome.syslog)
    last_ready = max(i for i, line in enumerate(lines) if line == READY)
    end = len(lines)
    while end > last_ready + 1 and lines[end - 1] in SHUTDOWN:
        end -= 1
    startup = [re.sub(r"^adminalert: PortSentry \S+ is starting\.$",
                      "adminalert: PortSentry <version> is starting.", line)
               for line in lines[:last_ready + 1]]
    return startup, lines[last_ready + 1:end], lines[end:]


def comparable(outcome: Outcome) -> dict[str, object]:
    startup, events, shutdown = sections(outcome)
    return {
        # README, Compatibility: several modes may share one process (one start-up and one
        # shutdown pair for all), and start-up lines name ports in ascending order, each once
        # (1.2: in the order of the config line). So start-up lines compare as a set.
        "startup": sorted(set(startup)),
        "events": events,
        "shutdown": sorted(set(shutdown)),
        "identities": sorted(outcome.identities),
        "history": list(outcome.history),
        "blocked": {mode: list(rows) for mode, rows in outcome.blocked.items()},
        "hosts.deny": list(outcome.hosts_deny),
        "commands": list(outcome.commands),
        "replies": list(outcome.replies),
    }


def show(outcome: Outcome) -> list[str]:
    out = [f"syslog: {line}" for line in outcome.syslog]
    out += [f"identity: {pri} {ident}" for pri, ident in sorted(outcome.identities)]
    out += [f"history: {line}" for line in outcome.history]
    out += [f"blocked.{mode}: {line}" for mode, rows in outcome.blocked.items() for line in rows]
    out += [f"hosts.deny: {line}" for line in outcome.hosts_deny]
    out += [f"command: {line}" for line in outcome.commands]
    out += [f"reply: {line}" for line in outcome.replies]
    return out


def assert_same(expected: Outcome, ours: Outcome, raw_legacy: Outcome) -> None:
    want, got = comparable(expected), comparable(ours)
    if want != got:
        diff = difflib.unified_diff(show(expected), show(ours), "1.2 (documented differences applied)",
                                    "ours", lineterm="", n=50)
        wrong = [key for key in want if want[key] != got[key]]
        pytest.fail(f"ours differs from 1.2 in {wrong}:\n" + "\n".join(diff)
                    + "\n\n1.2 as it ran:\n" + "\n".join(show(raw_legacy)), pytrace=False)


def run_side(kind: type[Side], case: Case, base: Path) -> Outcome:
    sock_dir = short_socket_dir()
    try:
        with namespaces_up() as net, SyslogReceiver(sock_dir / "log") as syslog:
            side = kind(net, base / kind.name, syslog)
            side.write_files(config_text(case.settings), case.ignore, case.etc)
            listeners: list[Listener] = []
            try:
                for proto, port in case.listeners:
                    listeners.append(Listener(net.target, proto, port))
                side.start(case.modes)
                case.traffic(net, side)
                settle(syslog)
            finally:
                try:
                    side.stop()
                finally:
                    for listener in listeners:
                        listener.close()
            settle(syslog, quiet=0.2)
            return side.outcome()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Traffic


def connect(side: Side, ns: str, target: str, port: int) -> None:
    result = tcp_connect(ns, target, port, timeout=1.0)
    side.replies.append(f"tcp {port} " + (f"data {result.data!r}" if result.connected else "refused"))
    settle(side.syslog, quiet=0.2)


def datagram(side: Side, ns: str, target: str, port: int) -> None:
    result = udp_send(ns, target, port, b"probe", reply_timeout=0.5)
    side.replies.append(f"udp reply {result.reply!r}" if result.reply is not None else "udp no reply")
    settle(side.syslog, quiet=0.2)


def probe(side: Side, ns: str, target: str, port: int, *flags: str, udp: bool = False) -> None:
    hping(ns, target, port, flags, udp=udp)
    settle(side.syslog, quiet=0.2)


def sequential_nmap(side: Side, ns: str, scan: str, ports: str, target: str = TARGET) -> None:
    """One probe at a time, ports in order, so both daemons see the same sequence."""
    nmap(ns, [scan, "-r", "--max-parallelism", "1", "--max-retries", "0", "-p", ports, target])
    settle(side.syslog, quiet=0.3)


def unignore_scanner2(side: Side) -> None:
    """A live edit of the ignore file (1.2 re-read it at every event; ours checks for changes,
    the capture's filter once a second: README, Configuration)."""
    (side.root.etc / "portsentry.ignore").write_text("127.0.0.1/32\n0.0.0.0\n")
    time.sleep(1.5)


def tcp_traffic(net: Namespaces, side: Side) -> None:
    connect(side, net.scanner, TARGET, 1)
    connect(side, net.scanner, TARGET, 11)  # already blocked: still gets the banner, as in 1.2
    connect(side, net.scanner2, TARGET2, 1)  # ignored: no line, no banner
    sequential_nmap(side, net.scanner, "-sT", "1,11,15,79")
    sequential_nmap(side, net.scanner2, "-sS", "1,11")  # half-open: never accepted, not a hit
    unignore_scanner2(side)
    connect(side, net.scanner2, TARGET2, 15)


def udp_traffic(net: Namespaces, side: Side) -> None:
    datagram(side, net.scanner, TARGET, 7)
    datagram(side, net.scanner, TARGET, 9)
    datagram(side, net.scanner2, TARGET2, 9)
    sequential_nmap(side, net.scanner, "-sU", "1,7,9")


def stcp_traffic(net: Namespaces, side: Side) -> None:
    for scan in ("-sS", "-sF", "-sN", "-sX"):
        sequential_nmap(side, net.scanner, scan, "1,11")
    for flags in (("-S", "-F"), ("-U",), ("-X",), ("-S", "-X", "-Y"), ("-A",), ("-R",), ("-S", "-A")):
        probe(side, net.scanner, TARGET, 15, *flags)
    probe(side, net.scanner, TARGET, 111, "-S", "-G")  # IP options (record route)
    probe(side, net.scanner, TARGET, 79, "-S")  # a live service: not watched
    probe(side, net.scanner, TARGET, 25, "-S")  # not a watched port
    probe(side, net.scanner2, TARGET2, 1, "-F")  # ignored
    unignore_scanner2(side)
    probe(side, net.scanner2, TARGET2, 1, "-S", "-G")  # no PTR name: the address twice
    # 1.2's README: delete a host's line from the blocked file to have it blocked again.
    (side.root.lib / "portsentry.blocked.stcp").write_text("")
    time.sleep(1.2)
    probe(side, net.scanner, TARGET, 11, "-S")


def sudp_traffic(net: Namespaces, side: Side) -> None:
    for ns, target, port in ((net.scanner, TARGET, 1), (net.scanner2, TARGET2, 1),
                             (net.scanner, TARGET, 7), (net.scanner2, TARGET2, 7),
                             (net.scanner, TARGET, 9), (net.scanner, TARGET, 53)):
        probe(side, ns, target, port, udp=True)


def atcp_traffic(net: Namespaces, side: Side) -> None:
    for port in (113, 139, 25, 2000, 80, 1):
        probe(side, net.scanner, TARGET, port, "-S")
    probe(side, net.scanner2, TARGET2, 5, "-F")
    probe(side, net.scanner2, TARGET2, 6, "-F")


def audp_traffic(net: Namespaces, side: Side) -> None:
    for port in (520, 53, 1500, 161, 69):
        probe(side, net.scanner, TARGET, port, udp=True)
    sequential_nmap(side, net.scanner, "-sU", "7,9")
    probe(side, net.scanner2, TARGET2, 7, udp=True)


def both_protocols(net: Namespaces, side: Side) -> None:
    connect(side, net.scanner, TARGET, 1)
    datagram(side, net.scanner, TARGET, 7)
    connect(side, net.scanner, TARGET, 11)
    datagram(side, net.scanner, TARGET, 9)
    datagram(side, net.scanner2, TARGET2, 1)


# ---------------------------------------------------------------------------------------------
# Cases: every mode; BLOCK_x 0/1/2, KILL_HOSTS_DENY, KILL_ROUTE, KILL_RUN_CMD with and without
# KILL_RUN_CMD_FIRST, PORT_BANNER, SCAN_TRIGGER, RESOLVE_HOST 0/1, ignored sources, ports in use.

ROUTE, RUN = record_command("route"), record_command("run")
CASES = [
    Case("tcp-block", ("-tcp",), {
        "TCP_PORTS": "1,11,15,79,111", "UDP_PORTS": "1,7,9", "RESOLVE_HOST": "0", "BLOCK_TCP": "1",
        "BLOCK_UDP": "1", "KILL_HOSTS_DENY": "ALL: $TARGET$", "KILL_ROUTE": ROUTE, "KILL_RUN_CMD": RUN,
        "KILL_RUN_CMD_FIRST": "0", "SCAN_TRIGGER": "0", "PORT_BANNER": BANNER,
    }, tcp_traffic, listeners=(("tcp", 111),)),
    Case("udp-block-cmd-first", ("-udp",), {
        "TCP_PORTS": "1,11", "UDP_PORTS": "1,7,9,69", "RESOLVE_HOST": "0", "BLOCK_TCP": "0",
        "BLOCK_UDP": "1", "KILL_HOSTS_DENY": "ALL: $TARGET$ : DENY", "KILL_ROUTE": ROUTE,
        "KILL_RUN_CMD": RUN, "KILL_RUN_CMD_FIRST": "1", "SCAN_TRIGGER": "0", "PORT_BANNER": BANNER,
    }, udp_traffic, listeners=(("udp", 69),), documented=(udp_banner_once,)),
    Case("stcp-scans-resolved", ("-stcp",), {
        "TCP_PORTS": "1,11,15,79,111", "UDP_PORTS": "1,7,9", "RESOLVE_HOST": "1", "BLOCK_TCP": "1",
        "BLOCK_UDP": "0", "KILL_HOSTS_DENY": "ALL: $TARGET$", "KILL_ROUTE": ROUTE, "SCAN_TRIGGER": "0",
    }, stcp_traffic, listeners=(("tcp", 79),), etc={"hosts": HOSTS, "resolv.conf": RESOLV},
        ignore=("127.0.0.1/32", "0.0.0.0", "198.18.1.77/24 host bits and words, as 1.2 took them"),
        documented=(null_scan_one_space, host_bits_warning, blocked_once)),
    Case("sudp-run-cmd-only-trigger", ("-sudp",), {
        "TCP_PORTS": "1", "UDP_PORTS": "1,7,9,53", "RESOLVE_HOST": "0", "BLOCK_TCP": "1",
        "BLOCK_UDP": "2", "KILL_HOSTS_DENY": "ALL: $TARGET$", "KILL_ROUTE": ROUTE, "KILL_RUN_CMD": RUN,
        "SCAN_TRIGGER": "2",
    }, sudp_traffic, ignore=("127.0.0.1/32", "0.0.0.0"), listeners=(("udp", 53),)),
    Case("atcp-log-only", ("-atcp",), {
        "TCP_PORTS": "1", "UDP_PORTS": "1", "ADVANCED_PORTS_TCP": "1024", "ADVANCED_PORTS_UDP": "1024",
        "ADVANCED_EXCLUDE_TCP": "113,139", "ADVANCED_EXCLUDE_UDP": "520,138,137,67",
        "RESOLVE_HOST": "0", "BLOCK_TCP": "0", "BLOCK_UDP": "0", "KILL_HOSTS_DENY": "ALL: $TARGET$",
        "KILL_ROUTE": ROUTE, "KILL_RUN_CMD": RUN, "SCAN_TRIGGER": "0",
    }, atcp_traffic, ignore=("127.0.0.1/32", "0.0.0.0"), listeners=(("tcp", 25),)),
    Case("audp-block-debian-excludes", ("-audp",), {
        "TCP_PORTS": "1", "UDP_PORTS": "1", "ADVANCED_PORTS_TCP": "1024", "ADVANCED_PORTS_UDP": "1024",
        "ADVANCED_EXCLUDE_TCP": "113,139", "ADVANCED_EXCLUDE_UDP": "520,138,137,67",
        "RESOLVE_HOST": "0", "BLOCK_TCP": "1", "BLOCK_UDP": "1", "KILL_ROUTE": ROUTE, "KILL_RUN_CMD": RUN,
        "KILL_RUN_CMD_FIRST": "1", "SCAN_TRIGGER": "0",
    }, audp_traffic, listeners=(("udp", 53),)),
    # Debian's shipped choices: -tcp and -udp, BLOCK_TCP/BLOCK_UDP 0 (log only).
    Case("tcp-udp-debian-log-only", ("-tcp", "-udp"), {
        "TCP_PORTS": "1,11,15", "UDP_PORTS": "1,7,9", "RESOLVE_HOST": "0", "BLOCK_TCP": "0",
        "BLOCK_UDP": "0", "KILL_ROUTE": "/sbin/route add -host $TARGET$ reject",
        "KILL_HOSTS_DENY": "ALL: $TARGET$ : DENY", "SCAN_TRIGGER": "0",
    }, both_protocols, ignore=("127.0.0.1/32", "0.0.0.0")),
    Case("tcp-udp-block", ("-tcp", "-udp"), {
        "TCP_PORTS": "1,11,15", "UDP_PORTS": "1,7,9", "RESOLVE_HOST": "0", "BLOCK_TCP": "1",
        "BLOCK_UDP": "1", "KILL_ROUTE": ROUTE, "KILL_HOSTS_DENY": "ALL: $TARGET$", "KILL_RUN_CMD": RUN,
        "SCAN_TRIGGER": "0",
    }, both_protocols, ignore=("127.0.0.1/32", "0.0.0.0"), documented=(blocked_once,)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_ours_writes_what_1_2_writes(case: Case, tmp_path: Path) -> None:
    try:
        legacy = run_side(Legacy, case, tmp_path)
    except RigError as error:
        pytest.fail(f"1.2 did not run the case: {error}", pytrace=False)
    ours = run_side(Ours, case, tmp_path)
    expected = legacy
    for difference in case.documented:
        expected = difference(expected)
    assert_same(expected, ours, legacy)
    # The comparison is not empty: every case makes 1.2 act (its outcome is what ours must match).
    assert any(line.startswith("attackalert:") for line in legacy.syslog), show(legacy)
