"""A full disk never leaves half a record, and every record that could not be written is said,
counted and shown by `status` (issue 9.4, 9.5).

hosts.deny, the history and blocked files and the event log live on a 64 KiB tmpfs in a private
mount namespace. Each of the first three files ends 6 bytes short of a page and every other page
is taken, so an append writes 6 bytes and then meets ENOSPC: a short write, the case that left
`ALL: 198.18.` (a prefix pattern denying 198.18.0.0/16) in hosts.deny.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.system.faults_helpers import MountNamespace, daemon_running, nft_set
from tests.system.rig import Daemon, Namespaces, SyslogReceiver, daemon_env, eventually, run_in, tcp_connect

pytestmark = pytest.mark.system

PAGE = 4096
FILL = PAGE - 6


def padded_comment() -> bytes:
    return b"#" + b"x" * (FILL - 2) + b"\n"


def padded_event() -> bytes:
    line = b'{"pad":"' + b"x" * (FILL - 11) + b'"}\n'
    assert len(line) == FILL
    return line


def test_a_full_disk_leaves_no_partial_record_and_says_so(
    namespaces: Namespaces, syslog: SyslogReceiver, tmp_path: Path
) -> None:
    net = namespaces
    logs = tmp_path / "logs"
    logs.mkdir()
    setup = f"mount -t tmpfs -o size=64k,mode=0755 tmpfs {logs}"
    with MountNamespace(net.target, setup) as mounts:
        files = {"hosts.deny": padded_comment(), "history": padded_comment(), "events.jsonl": padded_event()}
        for name, content in files.items():
            mounts.run(["sh", "-c", f"printf '%s' \"$1\" > {logs}/{name}", "sh", content.decode()])
        mounts.run(["dd", "if=/dev/zero", f"of={logs}/filler", "bs=4096"], check=False)
        df = mounts.run(["df", "--output=avail", str(logs)]).stdout.split()
        assert df[-1] == "0", f"tmpfs not full: {df}"
        daemon = Daemon(net, tmp_path / "daemon0", syslog, ("-tcp",), command=mounts.command, config={
            "TCP_PORTS": "1", "BLOCK_TCP": "1", "BAN_BACKEND": "nftables", "KILL_HOSTS_DENY": "ALL: $TARGET$",
            "HOSTS_DENY_FILE": f"{logs}/hosts.deny", "HISTORY_FILE": f"{logs}/history",
            "BLOCKED_FILE": f"{logs}/blocked", "EVENT_LOG": f"{logs}/events.jsonl",
        })
        with daemon_running(daemon):
            assert tcp_connect(net.scanner, net.target_ip4, 1).connected
            # The ban itself works (nftables); each record that could not be kept is said.
            syslog.wait_for(f"attackalert: Host {net.scanner_ip4} has been blocked via nftables")
            eventually(lambda: net.scanner_ip4 in nft_set(net.target), what="the nftables ban")
            syslog.wait_for(f"adminalert: cannot open hosts.deny file: {logs}/hosts.deny for blocking.")
            syslog.wait_for(f"securityalert: ERROR: There was an error trying to block host "
                            f"{net.scanner_ip4}")
            syslog.wait_for(f"adminalert: ERROR: Cannot open history file: {logs}/history.")
            syslog.wait_for(f"adminalert: ERROR: Cannot open blocked file: {logs}/blocked.tcp.")
            syslog.wait_for(f"adminalert: ERROR: cannot write event log {logs}/events.jsonl")
            # Not one byte of a half record anywhere.
            for name, content in files.items():
                assert mounts.run(["cat", f"{logs}/{name}"]).stdout.encode() == content, name
            status = run_in(net.target, [sys.executable, "-m", "portsentry", "status", "--json", "-c",
                                         str(daemon.conf_path)], env=daemon_env())
            failed = {entry["file"] for entry in json.loads(status.stdout)["write_failures"]}
            assert {"hosts_deny", "history", "blocked", "event_log"} <= failed, status.stdout
            text = run_in(net.target, [sys.executable, "-m", "portsentry", "status", "-c",
                                       str(daemon.conf_path)], env=daemon_env()).stdout
            assert "NOT WRITTEN:" in text and f"{logs}/history" in text
            # Room again: the next records are whole.
            mounts.run(["rm", f"{logs}/filler"])
            assert tcp_connect(net.scanner2, net.target2_ip4, 1).connected
            syslog.wait_for(f"attackalert: Host {net.scanner2_ip4} has been blocked via wrappers")
            deny = mounts.run(["cat", f"{logs}/hosts.deny"]).stdout
            assert deny == padded_comment().decode() + f"ALL: {net.scanner2_ip4}\n"
            history = mounts.run(["cat", f"{logs}/history"]).stdout.splitlines()
            assert history[-1].endswith(f"/{net.scanner2_ip4} Port: 1 TCP Blocked")
            for line in mounts.run(["cat", f"{logs}/events.jsonl"]).stdout.splitlines():
                json.loads(line)
