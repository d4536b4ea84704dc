"""Log rotation (issue 14): logrotate accepts packaging/logrotate/portsentry; after a rotation
(rename, then SIGUSR1: the snippet's postrotate) the daemon writes its history and event lines to
the new files and reloads nothing; and the snippet itself, run by a real logrotate where its fixed
paths are (a private mount namespace), rotates both files and reaches the daemon."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.system.privateroot import PrivateRoot, enter
from tests.system.rig import DAEMON_COMMAND, Daemon, eventually, tcp_connect

pytestmark = [pytest.mark.system]

SNIPPET = Path(__file__).resolve().parents[2] / "packaging" / "logrotate" / "portsentry"
REOPENED = "adminalert: PortSentry reopened its log files"
BLOCKING = {"TCP_PORTS": "1,2", "BLOCK_TCP": "1", "KILL_HOSTS_DENY": "ALL: $TARGET$"}


def logrotate() -> str:
    found = shutil.which("logrotate", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if found is None:
        pytest.fail("logrotate is installed by scripts/setup")
    return found


def ports_in(events: Path) -> set[int]:
    text = events.read_text() if events.exists() else ""
    return {json.loads(line)["port"] for line in text.splitlines() if "port" in json.loads(line)}


def test_logrotate_accepts_the_snippet(tmp_path: Path) -> None:
    done = subprocess.run([logrotate(), "-d", "-s", str(tmp_path / "state"), str(SNIPPET)],
                          capture_output=True, text=True, timeout=60, check=False)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "error" not in said.lower(), said
    for path in ("/var/lib/portsentry/portsentry.history", "/var/log/portsentry/events.jsonl"):
        assert f"considering log {path}" in said, said


def test_renamed_files_get_new_lines_after_sigusr1_and_nothing_is_reloaded(daemon_factory, namespaces,
                                                                            syslog, tmp_path):
    net = namespaces
    events = tmp_path / "events.jsonl"
    daemon = daemon_factory("-tcp", EVENT_LOG=str(events), **BLOCKING)
    history = daemon.history_path
    tcp_connect(net.scanner, net.target_ip4, 1)
    eventually(lambda: net.scanner_ip4 in daemon.history_text() and ports_in(events) == {1},
               what="the first history line and event")
    history.rename(f"{history}.1")  # what logrotate does
    events.rename(tmp_path / "events.jsonl.1")
    mark = syslog.mark()
    os.kill(daemon.pid, signal.SIGUSR1)
    syslog.wait_for(REOPENED, since=mark)
    assert events.exists()  # opened again by name at once, before anything was written to it
    tcp_connect(net.scanner2, net.target2_ip4, 2)
    eventually(lambda: net.scanner2_ip4 in daemon.history_text() and 2 in ports_in(events),
               what="the second scanner in the new files")
    assert net.scanner_ip4 not in daemon.history_text()
    assert net.scanner2_ip4 not in Path(f"{history}.1").read_text()
    assert ports_in(tmp_path / "events.jsonl.1") == {1}
    assert syslog.find("reloaded its configuration", since=mark) is None
    assert daemon.running


def test_the_snippet_rotates_both_files_and_its_postrotate_reaches_the_daemon(namespaces, syslog, tmp_path):
    """The snippet unchanged, at its paths: /var/lib/portsentry, /var/log/portsentry and /run are
    the test's directories in a private mount namespace, and the daemon has the SysV script's pid
    file, which the postrotate uses (there is no systemd in that /run)."""
    net = namespaces
    root = PrivateRoot(tmp_path / "root")
    config = {**BLOCKING, "HISTORY_FILE": "/var/lib/portsentry/portsentry.history",
              "STATE_DIR": "/var/lib/portsentry", "EVENT_LOG": "/var/log/portsentry/events.jsonl"}
    daemon = Daemon(net, tmp_path / "daemon", syslog, ("-tcp",), command=root.wrap(DAEMON_COMMAND),
                    extra_args=["--pid-file", "/run/portsentry.pid"], config=config)
    history, events = root.lib / "portsentry.history", root.log / "events.jsonl"
    try:
        daemon.start()
        tcp_connect(net.scanner, net.target_ip4, 1)
        eventually(lambda: history.exists() and net.scanner_ip4 in history.read_text()
                   and ports_in(events) == {1}, what="the first history line and event")
        mark = syslog.mark()
        rotated = subprocess.run(enter(daemon.pid, [logrotate(), "-v", "-f", "-s", str(tmp_path / "state"),
                                                    str(SNIPPET)]),
                                 capture_output=True, text=True, timeout=60, check=False)
        said = rotated.stdout + rotated.stderr
        assert rotated.returncode == 0, said
        assert re.search(r"running postrotate script", said), said
        syslog.wait_for(REOPENED, since=mark)  # through the pid file: no systemd there
        old_lines = (root.lib / "portsentry.history.1").read_text().splitlines()
        assert len(old_lines) == 1 and f"Host: {net.scanner_ip4}/" in old_lines[0], old_lines
        assert ports_in(root.log / "events.jsonl.1") == {1}
        assert history.stat().st_mode & 0o777 == 0o600 and history.read_text() == ""  # `create`
        tcp_connect(net.scanner2, net.target2_ip4, 2)
        eventually(lambda: net.scanner2_ip4 in history.read_text() and ports_in(events) == {2},
                   what="the second scanner in the new files")
        assert net.scanner_ip4 not in history.read_text()
        assert syslog.find("reloaded its configuration", since=mark) is None
        assert daemon.running
    finally:
        if daemon.proc is not None:
            daemon.stop()
