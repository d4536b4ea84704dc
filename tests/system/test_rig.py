"""Proves the system-test rig without the daemon: namespaces and links come up and go away,
scanner helpers reach real listeners over IPv4 and IPv6, nmap works across the veth, the syslog
receiver parses what clients send, and the Daemon helper starts, waits for and stops a process."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.system.rig import (
    READY_TEXT,
    Daemon,
    Listener,
    Namespaces,
    RigError,
    SyslogReceiver,
    destroy_namespaces,
    list_namespaces,
    namespaces_up,
    new_prefix,
    nmap,
    nmap_ports,
    parse_syslog,
    popen_in,
    run_in,
    tcp_connect,
    udp_send,
)
from tests.system.teardown import RUN_PREFIX

PORT = 8765
CLOSED_PORT = 8766


def addresses(ns: str) -> dict[str, set[str]]:
    """Interface -> its addresses (with prefix length) inside `ns`."""
    out = run_in(ns, ["ip", "-j", "addr", "show"], check=True).stdout
    return {
        link["ifname"]: {f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])}
        for link in json.loads(out)
    }


def test_namespaces_have_their_addresses_and_loopback(namespaces: Namespaces) -> None:
    net = namespaces
    assert set(list_namespaces(net.prefix)) == set(net.names)
    assert all(name.startswith(RUN_PREFIX) for name in net.names)
    tgt = addresses(net.target)
    assert {"127.0.0.1/8", "::1/128"} <= tgt["lo"]
    assert {"198.18.0.1/24", "fd00:18::1/64"} <= tgt["eth0"]
    assert {"198.18.1.1/24", "fd00:18:1::1/64"} <= tgt["eth1"]
    assert {"198.18.0.2/24", "fd00:18::2/64"} <= addresses(net.scanner)["eth0"]
    assert {"198.18.1.2/24", "fd00:18:1::2/64"} <= addresses(net.scanner2)["eth0"]
    # nodad and accept_dad=0: nothing may still be tentative, or early IPv6 probes would vanish.
    out = run_in(net.target, ["ip", "-6", "addr", "show", "tentative"], check=True).stdout
    assert out.strip() == ""
    # The host's namespace got no interface of ours.
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert net.prefix not in host_links


def test_scanners_reach_a_target_listener_over_ipv4_and_ipv6(namespaces: Namespaces) -> None:
    net = namespaces
    with Listener(net.target, "tcp", PORT, banner=b"hello\n") as listener:
        cases = [
            (net.scanner, net.target_ip4, net.scanner_ip4),
            (net.scanner, net.target_ip6, net.scanner_ip6),
            (net.scanner2, net.target2_ip4, net.scanner2_ip4),
            (net.scanner2, net.target2_ip6, net.scanner2_ip6),
            # Default routes via the target: scanner2 also reaches the target's first link.
            (net.scanner2, net.target_ip4, net.scanner2_ip4),
        ]
        for ns, addr, source in cases:
            result = tcp_connect(ns, addr, PORT)
            assert result.connected, (ns, addr, result.error)
            assert result.data == b"hello\n"
            assert listener.wait_for_peer(source).peer == source
        assert len(listener.hits()) == len(cases)


def test_closed_port_is_refused_not_timed_out(namespaces: Namespaces) -> None:
    started = time.monotonic()
    result = tcp_connect(namespaces.scanner, namespaces.target_ip4, CLOSED_PORT, timeout=5)
    assert not result.connected
    assert "ConnectionRefused" in result.error
    assert time.monotonic() - started < 4


def test_udp_send_reaches_a_listener_and_sees_unreachable(namespaces: Namespaces) -> None:
    net = namespaces
    with Listener(net.target, "udp", PORT) as listener:
        echoed = udp_send(net.scanner, net.target_ip6, PORT, b"ping", reply_timeout=3)
        assert echoed.reply == b"ping" and not echoed.refused
        assert listener.wait_for_peer(net.scanner_ip6).payload == b"ping"
        fire_and_forget = udp_send(net.scanner2, net.target2_ip4, PORT, b"\x00\xff")
        assert fire_and_forget.reply is None
        assert listener.wait_for_peer(net.scanner2_ip4).payload == b"\x00\xff"
    closed = udp_send(net.scanner, net.target_ip4, CLOSED_PORT, reply_timeout=3)
    assert closed.refused and closed.reply is None


def test_nmap_connect_scan_sees_the_listener(namespaces: Namespaces) -> None:
    net = namespaces
    with Listener(net.target, "tcp", PORT):
        ports = f"{PORT},{CLOSED_PORT}"
        v4 = nmap_ports(nmap(net.scanner, ["-sT", "-p", ports, net.target_ip4]).stdout)
        assert v4 == {PORT: "open", CLOSED_PORT: "closed"}
        v6 = nmap_ports(nmap(net.scanner2, ["-6", "-sS", "-p", ports, net.target2_ip6]).stdout)
        assert v6 == {PORT: "open", CLOSED_PORT: "closed"}


def test_nmap_ports_parses_normal_output() -> None:
    out = (
        "PORT      STATE         SERVICE\n"
        "1/tcp     open          tcpmux\n"
        "53/udp    open|filtered domain\n"
        "8766/tcp  closed        unknown\n"
    )
    assert nmap_ports(out) == {1: "open", 53: "open|filtered", 8766: "closed"}


def test_syslog_receiver_parses_a_client_in_the_target_namespace(
    namespaces: Namespaces, syslog: SyslogReceiver
) -> None:
    # Unix sockets are filesystem objects, so a sender inside the target namespace reaches it.
    client = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "stamp = time.strftime('%b %e %H:%M:%S')\n"
        "s.sendto(f'<29>{stamp} portsentry[4242]: adminalert: hello\\n'.encode(), sys.argv[1])\n"
        "s.sendto(b'not syslog at all', sys.argv[1])\n"
    )
    run_in(namespaces.target, [sys.executable, "-c", client, str(syslog.path)], check=True)
    record = syslog.wait_for("adminalert: hello", timeout=5)
    assert (record.pri, record.facility, record.severity) == (29, 3, 5)
    assert (record.ident, record.pid, record.hostname) == ("portsentry", 4242, None)
    assert record.message == "adminalert: hello"
    assert re.fullmatch(r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d", record.timestamp)
    deadline = time.monotonic() + 5
    while not syslog.malformed() and time.monotonic() < deadline:
        syslog.wait_any(0.1)
    assert syslog.malformed() == [b"not syslog at all"]
    assert syslog.messages() == ["adminalert: hello"]


@pytest.mark.skipif(shutil.which("logger") is None, reason="util-linux logger not installed")
def test_syslog_receiver_understands_util_linux_logger(syslog: SyslogReceiver) -> None:
    subprocess.run(
        ["logger", "--rfc3164", "-u", str(syslog.path), "-t", "portsentry", "--id=777",
         "-p", "daemon.notice", "attackalert: from logger"],
        check=True, timeout=10,
    )
    record = syslog.wait_for(re.compile(r"^attackalert: from logger$"), timeout=5)
    assert (record.pri, record.ident, record.pid) == (29, "portsentry", 777)


def test_wait_for_times_out_with_what_it_saw(tmp_path: Path) -> None:
    with SyslogReceiver(tmp_path / "log") as rx:
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.sendto(b"<29>Nov  6 01:02:03 portsentry[1]: adminalert: first", str(rx.path))
        sender.close()
        rx.wait_for("first", timeout=5)
        mark = rx.mark()
        with pytest.raises(AssertionError, match=r"(?s)never.*adminalert: first"):
            rx.wait_for("never", timeout=0.3)
        with pytest.raises(AssertionError, match="first"):
            rx.wait_for("first", timeout=0.2, since=mark)
        with pytest.raises(AssertionError, match="unexpected"):
            rx.assert_absent(re.compile("^admin"), wait=0)
        rx.assert_absent("first", wait=0, since=mark)
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize(
    ("datagram", "expected"),
    [
        (b"<29>Nov 26 15:00:00 portsentry[1234]: attackalert: Connect from host: "
         b"198.18.0.2/198.18.0.2 to TCP port: 1",
         (29, "Nov 26 15:00:00", None, "portsentry", 1234,
          "attackalert: Connect from host: 198.18.0.2/198.18.0.2 to TCP port: 1")),
        (b"<13>Jan  2 03:04:05 myhost logger: x: y\x00",
         (13, "Jan  2 03:04:05", "myhost", "logger", None, "x: y")),
        (b"<191>Dec 31 23:59:59 a[1]: \n", (191, "Dec 31 23:59:59", None, "a", 1, "")),
    ],
)
def test_parse_syslog_accepts(datagram: bytes, expected: tuple[object, ...]) -> None:
    r = parse_syslog(datagram)
    assert r is not None
    assert (r.pri, r.timestamp, r.hostname, r.ident, r.pid, r.message) == expected


@pytest.mark.parametrize(
    "datagram",
    [b"", b"hello", b"<192>Nov 26 15:00:00 p[1]: m", b"<29>2024-11-26T15:00:00Z p[1]: m",
     b"<29>Nov 26 15:00:00 p[x]: m", b"29>Nov 26 15:00:00 p[1]: m"],
)
def test_parse_syslog_rejects(datagram: bytes) -> None:
    assert parse_syslog(datagram) is None


@given(st.binary(max_size=300))
def test_parse_syslog_never_raises(datagram: bytes) -> None:
    record = parse_syslog(datagram)
    if record is not None:
        assert 0 <= record.pri <= 191


@given(
    pri=st.integers(0, 191),
    pid=st.integers(1, 2**22),
    message=st.text(st.characters(blacklist_categories=["Cs"]), max_size=200).map(
        lambda s: s.rstrip("\n\x00")
    ),
)
def test_parse_syslog_round_trips(pri: int, pid: int, message: str) -> None:
    raw = f"<{pri}>Nov 26 15:00:00 portsentry[{pid}]: {message}".encode()
    record = parse_syslog(raw)
    assert record is not None
    assert (record.pri, record.pid, record.message) == (pri, pid, message)


def test_namespaces_and_their_processes_go_away_even_when_the_body_fails() -> None:
    prefix = new_prefix()
    procs: list[subprocess.Popen[bytes]] = []
    with pytest.raises(RuntimeError, match="boom"), namespaces_up(prefix) as net:
        assert list_namespaces(prefix) == sorted(net.names)
        procs.append(popen_in(net.target, ["sleep", "600"]))
        raise RuntimeError("boom")
    assert list_namespaces(prefix) == []
    # The cleanup killed what ran inside rather than leaving it holding the namespace.
    assert procs[0].wait(timeout=5) == -9


def test_half_built_topology_is_removed() -> None:
    prefix = new_prefix()
    # Occupy the scanner2 name so creation fails part-way.
    subprocess.run(["ip", "netns", "add", f"{prefix}-scan2"], check=True)
    try:
        with pytest.raises(RigError, match="scan2"), namespaces_up(prefix):
            pass
        assert list_namespaces(prefix) == [f"{prefix}-scan2"]
    finally:
        subprocess.run(["ip", "netns", "del", f"{prefix}-scan2"], check=True)


# A stand-in for the daemon: honours the CLI contract the rig relies on (syslog socket, readiness
# line, SIGTERM -> "shutting down" and exit 0); "hang" ignores SIGTERM; "fail" dies at startup.
FAKE_DAEMON = r"""
import os, signal, socket, sys, time
args = sys.argv[1:]
sock_path = args[args.index("--syslog-socket") + 1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def log(msg):
    print(msg, file=sys.stderr, flush=True)
    s.sendto(f"<29>{time.strftime('%b %e %H:%M:%S')} portsentry[{os.getpid()}]: {msg}".encode(),
             sock_path)
conf = open(args[args.index("-c") + 1]).read()
if "fail" in args:
    print("portsentry.conf:1: broken", file=sys.stderr)
    sys.exit(1)
if "hang" in args:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def term(*_):
        log("adminalert: PortSentry is shutting down")
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
log("adminalert: config has %d lines" % len(conf.splitlines()))
log("adminalert: PortSentry is now active and listening.")
while True:
    time.sleep(1)
"""


def fake_daemon(net: Namespaces, tmp_path: Path, syslog: SyslogReceiver, *args: str) -> Daemon:
    return Daemon(
        net, tmp_path / "d", syslog, ("tcp", "-udp"),
        command=(sys.executable, "-c", FAKE_DAEMON), extra_args=args,
        config={"TCP_PORTS": "1,2", "BLOCK_UDP": None},
    )


def test_daemon_helper_starts_waits_and_stops(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path
) -> None:
    daemon = fake_daemon(namespaces, tmp_path, syslog)
    daemon.start()
    assert daemon.running
    conf = daemon.conf_path.read_text()
    assert 'TCP_PORTS="1,2"\n' in conf
    assert "BLOCK_UDP" not in conf
    assert f'HOSTS_DENY_FILE="{daemon.hosts_deny_path}"\n' in conf
    assert daemon.hosts_deny_path.exists()
    assert daemon.ignore_path.read_text() == "127.0.0.1/32\n"
    assert syslog.find(READY_TEXT) is not None
    # It runs inside the target namespace.
    link = Path(f"/proc/{daemon.pid}/ns/net").readlink()
    target = Path(f"/run/netns/{namespaces.target}").stat().st_ino
    assert str(link) == f"net:[{target}]"
    assert daemon.stop() == 0
    assert not daemon.hung
    syslog.wait_for("PortSentry is shutting down", timeout=5)
    assert "PortSentry is now active and listening." in daemon.stderr_text()
    assert daemon.argv()[-3:] == ["--log-stderr", "-tcp", "-udp"]


def test_daemon_helper_reports_startup_failure(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path
) -> None:
    daemon = fake_daemon(namespaces, tmp_path, syslog, "fail")
    with pytest.raises(RigError, match=r"(?s)exited 1 before it was ready.*portsentry.conf:1"):
        daemon.start()
    daemon2 = fake_daemon(namespaces, tmp_path / "2", syslog, "fail")
    daemon2.start(wait_ready=False)
    assert daemon2.wait_exit() == 1


def test_daemon_helper_kills_a_hung_daemon(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path
) -> None:
    daemon = fake_daemon(namespaces, tmp_path, syslog, "hang").start()
    assert daemon.stop(timeout=0.5) == -9
    assert daemon.hung


_HELD_BY_A_TERMINATED_RUN = '''
from pathlib import Path

from tests.system.rig import namespaces_up


def test_holds_namespaces_until_killed() -> None:
    with namespaces_up():
        Path({ready!r}).write_text("up")
        import time
        time.sleep(60)
'''


def test_a_run_ended_by_sigterm_still_removes_its_namespaces(tmp_path: Path) -> None:
    """A CI timeout ends pytest with SIGTERM: the fixtures' teardown must still run."""
    ready = tmp_path / "ready"
    (tmp_path / "test_held.py").write_text(_HELD_BY_A_TERMINATED_RUN.format(ready=str(ready)))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_held.py")],
        cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prefix = f"ps-{run.pid}-"
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert run.poll() is None, f"the inner run ended early:\n{run.communicate()[0]}"
            assert time.monotonic() < deadline, "the inner run never brought its namespaces up"
            time.sleep(0.05)
        assert list_namespaces(prefix), "the inner run's namespaces are not there to be removed"
        run.terminate()
        output, _ = run.communicate(timeout=30)
        assert list_namespaces(prefix) == [], f"SIGTERM left namespaces behind:\n{output}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        destroy_namespaces(list_namespaces(prefix))
