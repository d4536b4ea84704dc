"""The programs around a Debian portsentry, for real (issue 14): rsyslogd writes our lines to a
messages file in the familiar form, and Debian's fail2ban, with its stock portsentry filter and
jail pointed at our history file, bans the scanner. Each runs in the test's target namespace and a
private mount namespace (rsyslogd) with its own configuration, socket, pid file and output in a
temp dir; fail2ban's stock nftables action bans in the target namespace's ruleset: nothing on this
host changes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.rig import Listener, daemon_env, eventually, popen_in, run_in, stop_process, tcp_connect

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

# "Dec  5 15:50:23 host portsentry[1200]: attackalert: ..." (RSYSLOG_TraditionalFileFormat)
TRADITIONAL = re.compile(
    r"^[A-Z][a-z]{2} [ 0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-6][0-9] \S+ portsentry\[(\d+)\]: (.*)$")


def our_config(tmp_path: Path) -> Path:
    conf = tmp_path / "portsentry.conf"
    settings = {
        "TCP_PORTS": "1,79", "BLOCK_TCP": "1", "KILL_HOSTS_DENY": "ALL: $TARGET$",
        "HOSTS_DENY_FILE": str(tmp_path / "hosts.deny"), "IGNORE_FILE": str(tmp_path / "ignore"),
        "HISTORY_FILE": str(tmp_path / "portsentry.history"), "BLOCKED_FILE": str(tmp_path / "blocked"),
        "STATE_DIR": str(tmp_path / "state"), "CONTROL_SOCKET": str(tmp_path / "control.sock"),
    }
    conf.write_text("".join(f'{key}="{value}"\n' for key, value in settings.items()))
    (tmp_path / "ignore").write_text("127.0.0.1\n")
    (tmp_path / "hosts.deny").touch()
    return conf


def connect(ns: str, address: str, port: int) -> None:
    script = (f"import socket\ntry: socket.create_connection(('{address}', {port}), 2).close()\n"
              "except OSError: pass")
    run_in(ns, [sys.executable, "-c", script], timeout=10)


def test_rsyslogd_writes_our_lines_in_the_familiar_form(namespaces, tmp_path: Path) -> None:
    if shutil.which("rsyslogd") is None:
        pytest.fail("rsyslog is installed by scripts/setup")
    net = namespaces
    work = tmp_path / "rsyslog"
    (work / "spool").mkdir(parents=True)
    sock, messages = work / "log", work / "messages"
    rconf = work / "rsyslog.conf"
    rconf.write_text(
        f'global(workDirectory="{work}/spool")\n'
        'module(load="imuxsock" SysSock.Use="off")\n'
        f'input(type="imuxsock" Socket="{sock}" CreatePath="on")\n'
        f'*.* action(type="omfile" file="{messages}" template="RSYSLOG_TraditionalFileFormat")\n')
    rsyslog = popen_in(net.target, ["unshare", "-m", "--propagation", "private", "rsyslogd", "-n",
                                    "-f", str(rconf), "-i", str(work / "rsyslogd.pid")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    try:
        eventually(sock.exists, timeout=15, what="rsyslogd's socket")
        conf = our_config(tmp_path)
        daemon = popen_in(net.target, [sys.executable, "-m", "portsentry", "-c", str(conf),
                                       "--syslog-socket", str(sock), "-tcp"], env=daemon_env())
        eventually(lambda: messages.exists() and "PortSentry is now active" in messages.read_text(),
                   timeout=20, what="the start lines in the messages file")
        connect(net.scanner, net.target_ip4, 79)
        who = re.escape(net.scanner_ip4)
        eventually(lambda: re.search(rf"attackalert: Connect from host: {who}/{who} to TCP port: 79",
                                     messages.read_text()), timeout=15, what="the attackalert line")
        # The block is carried out on a responder thread: its line comes a little later.
        eventually(lambda: re.search(rf"attackalert: Host {who} has been blocked", messages.read_text()),
                   timeout=15, what="the block line")
        lines = [line for line in messages.read_text().splitlines() if "portsentry[" in line]
        parsed = [TRADITIONAL.match(line) for line in lines]
        assert len(lines) >= 4 and all(parsed), lines
        assert {int(m.group(1)) for m in parsed if m} == {daemon.pid}
        assert {m.group(2) for m in parsed if m} >= {
            "adminalert: PortSentry is now active and listening.",
            f"attackalert: Connect from host: {net.scanner_ip4}/{net.scanner_ip4} to TCP port: 79"}
    finally:
        if daemon is not None:
            stop_process(daemon)
        stop_process(rsyslog)


# Only the jail's log path is ours; its filter, maxretry and action are Debian's stock ones, with
# the stock nftables-allports action as banaction (fail2ban runs in the target namespace, so its
# nft commands change that namespace's ruleset only).
FAIL2BAN_JAIL = """\
[DEFAULT]
backend = polling
banaction = nftables-allports
[portsentry]
enabled = true
logpath = {history}
"""


def test_debian_s_fail2ban_with_its_stock_portsentry_jail_bans_the_scanner(namespaces, tmp_path):
    if shutil.which("fail2ban-server") is None or not Path("/etc/fail2ban/filter.d/portsentry.conf").exists():
        pytest.fail("fail2ban is installed by scripts/setup")
    net = namespaces
    conf = our_config(tmp_path)
    history = tmp_path / "portsentry.history"
    f2b = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", f2b)  # Debian's stock filter.d/portsentry.conf and jail.conf
    for stale in ("jail.d", "paths-overrides.local"):
        shutil.rmtree(f2b / stale, ignore_errors=True)
    (f2b / "jail.local").write_text(FAIL2BAN_JAIL.format(history=history))
    (f2b / "fail2ban.local").write_text(f"[Definition]\ndbfile = {tmp_path}/f2b.sqlite3\n"
                                        f"logtarget = {tmp_path}/fail2ban.log\n")
    history.touch()
    sock, pid = tmp_path / "f2b.sock", tmp_path / "f2b.pid"
    server = popen_in(net.target, ["fail2ban-server", "-f", "-c", str(f2b), "-s", str(sock), "-p", str(pid),
                                   "-x"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    web = Listener(net.target, "tcp", 8080, banner=b"hello\n")  # a service nobody watches
    try:
        eventually(sock.exists, timeout=30, what="fail2ban's socket")
        assert tcp_connect(net.scanner, net.target_ip4, 8080).connected  # before: served
        daemon = popen_in(net.target, [sys.executable, "-m", "portsentry", "-c", str(conf), "--no-syslog",
                                       "-tcp"], env=daemon_env())
        eventually(lambda: (tmp_path / "control.sock").exists(), timeout=20, what="portsentry ready")
        connect(net.scanner, net.target_ip4, 79)
        eventually(lambda: net.scanner_ip4 in history.read_text(), timeout=15, what="our history line")

        def banned_by_fail2ban() -> bool:
            listed = run_in(net.target, ["nft", "list", "set", "inet", "f2b-table", "addr-set-portsentry"])
            return net.scanner_ip4 in listed.stdout

        eventually(banned_by_fail2ban, timeout=30, what="the scanner in fail2ban's nftables set")
        status = run_in(net.target, ["fail2ban-client", "-s", str(sock), "status", "portsentry"], timeout=30)
        assert net.scanner_ip4 in status.stdout, status.stdout + status.stderr
        # portsentry itself blocks only by hosts.deny here: the kernel's refusal is fail2ban's.
        assert not tcp_connect(net.scanner, net.target_ip4, 8080).connected
        assert tcp_connect(net.scanner2, net.target2_ip4, 8080).connected  # others still served
    finally:
        web.close()
        if daemon is not None:
            stop_process(daemon)
        run_in(net.target, ["fail2ban-client", "-s", str(sock), "stop"], timeout=30)
        stop_process(server, timeout=10)
    # fail2ban's actionstop removed its table
    assert run_in(net.target, ["nft", "list", "table", "inet", "f2b-table"]).returncode != 0
