"""Debian's real portsentry 1.2-14 configuration loads as 1.2 reads it.

A system test because it fetches Debian's package (scripts/fetch-debian-portsentry, which
`scripts/setup` runs too): unit tests run offline (issue 9.10).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from portsentry.config.settings import load_config
from tests.system.privateroot import PrivateRoot, enter
from tests.system.rig import (
    READY_TEXT,
    SyslogReceiver,
    daemon_env,
    eventually,
    popen_in,
    run_in,
    stop_process,
)
from tests.unit.config.test_settings import CLASSIC_TCP, CLASSIC_UDP, _round_trip

REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch-debian-portsentry"
DEBIAN_CONF = REPO_ROOT / ".cache" / "debian-portsentry" / "etc" / "portsentry" / "portsentry.conf"


def debian_conf() -> Path:
    if not DEBIAN_CONF.is_file():
        result = subprocess.run(
            [str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
        )
        if result.returncode != 0 or not DEBIAN_CONF.is_file():
            pytest.fail(
                f"could not fetch Debian's portsentry package (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
    return DEBIAN_CONF


def test_debian_config_loads_as_1_2_reads_it() -> None:
    loaded = load_config(str(debian_conf()))
    assert loaded.warnings == ()
    config = loaded.config
    assert config.tcp_ports == tuple(sorted(set(map(int, CLASSIC_TCP.split(",")))))
    assert config.udp_ports == tuple(sorted(set(map(int, CLASSIC_UDP.split(",")))))
    assert (config.advanced_ports_tcp, config.advanced_ports_udp) == (1024, 1024)
    assert config.advanced_exclude_tcp == (113, 139)
    assert config.advanced_exclude_udp == (67, 137, 138, 520)
    assert config.ignore_file == "/etc/portsentry/portsentry.ignore"
    assert config.history_file == "/var/lib/portsentry/portsentry.history"
    assert config.blocked_file == "/var/lib/portsentry/portsentry.blocked"
    assert config.resolve_host is False  # written RESOLVE_HOST = "0", with spaces
    assert (config.block_tcp, config.block_udp) == (0, 0)
    assert config.kill_route == "/sbin/route add -host $TARGET$ reject"
    assert config.kill_hosts_deny == "ALL: $TARGET$ : DENY"
    assert config.kill_run_cmd is None
    assert config.kill_run_cmd_first is False
    assert config.scan_trigger == 0
    assert config.port_banner is None
    _round_trip(config)


# As Debian's postinst writes /etc/default/portsentry (it is not in the .deb; debconf's answers
# go in); the modes differ from the unit's fallback flags, so the test sees which were taken.
DEBIAN_DEFAULTS = """\
# /etc/default/portsentry
#
# This file is read by /etc/init.d/portsentry. See the portsentry.8
# manpage for details.
#
# The options in this file refer to commandline arguments (all in lowercase)
# of portsentry. Use only one tcp and udp mode at a time.
#
TCP_MODE="atcp"
UDP_MODE="sudp"
"""
STATIC_NOTE = "portsentry.ignore does not exist; using /etc/portsentry/portsentry.ignore.static"


def debian_root(tmp_path: Path) -> PrivateRoot:
    """Debian's untouched portsentry.conf and portsentry.ignore.static (no portsentry.ignore:
    Debian's init script builds it at every start) and its /etc/default/portsentry."""
    root = PrivateRoot(tmp_path / "root")
    shipped = debian_conf().parent
    for name in ("portsentry.conf", "portsentry.ignore.static"):
        shutil.copy(shipped / name, root.etc / name)
    (root.default / "portsentry").write_text(DEBIAN_DEFAULTS)
    return root


def assert_debian_modes(syslog: SyslogReceiver) -> None:
    """/etc/default/portsentry's -atcp -sudp, not the fallback flags -tcp -udp -atcp -audp."""
    assert syslog.find("Advanced Stealth scan detection mode activated"), syslog.describe()
    assert syslog.find(re.compile(r"Going into stealth listen mode on UDP port"))
    assert syslog.find(re.compile(r"Going into listen mode on (TCP|UDP) port")) is None
    assert syslog.find(re.compile(r"Advanced Stealth scan detection mode activated\. Ignored UDP")) is None
    # Said once at the start (and by check-config), not at every re-read of the ignore list.
    said = re.compile(f"adminalert: WARNING: IGNORE_FILE .*{re.escape(STATIC_NOTE)}")
    assert len(syslog.find_all(said)) == 1


def test_debian_s_untouched_files_pass_check_config_and_the_service_takes_its_modes(
        namespaces, syslog, tmp_path):
    """The unit's ExecStartPre and ExecStart lines, as written, with Debian's files at their
    paths in a private mount namespace inside the test's network namespace."""
    root = debian_root(tmp_path)
    unit = (REPO_ROOT / "packaging" / "systemd" / "portsentry.service").read_text()
    (check_line,) = [line.split("=", 1)[1] for line in unit.splitlines()
                     if line.startswith("ExecStartPre=/usr/bin/portsentry check-config")]
    (start_line,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart=")]
    python = f"{shlex.quote(sys.executable)} -m portsentry"
    check = check_line.replace("/usr/bin/portsentry", python)
    start = start_line.replace("/usr/bin/portsentry", python)
    script = (f"{check} > {tmp_path}/check.out 2>&1; "
              f"exec {start} --syslog-socket {shlex.quote(str(syslog.path))}")
    proc = popen_in(namespaces.target, root.wrap(["sh", "-c", script]),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=daemon_env())
    try:
        syslog.wait_for(READY_TEXT, timeout=30)
        checked = (tmp_path / "check.out").read_text()
        assert "configuration OK" in checked, checked
        assert STATIC_NOTE in checked
        assert "modes: -atcp -sudp (TCP_MODE, UDP_MODE in /etc/default/portsentry)" in checked, checked
        assert_debian_modes(syslog)
        os.kill(proc.pid, signal.SIGHUP)  # systemctl reload
        syslog.wait_for("PortSentry reloaded its configuration from /etc/portsentry/portsentry.conf")
        assert_debian_modes(syslog)
    finally:
        stop_process(proc)
    assert not (Path("/etc/portsentry")).exists()  # the host's /etc is as it was


def test_the_sysv_script_starts_reloads_and_stops_the_daemon_with_debian_s_modes(
        namespaces, syslog, tmp_path):
    """packaging/sysv/portsentry as /etc/init.d/portsentry would run it: it sources
    /etc/default/portsentry and /etc/sysconfig/portsentry (here: only PORTSENTRY, the command),
    forks the daemon with a pid file in /run, and finds it again for status, reload and stop."""
    root = debian_root(tmp_path)
    command = tmp_path / "portsentry"
    command.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m portsentry \"$@\" "
                       f"--syslog-socket {shlex.quote(str(syslog.path))}\n")
    command.chmod(0o755)
    (root.base / "sysconfig").mkdir()
    (root.base / "sysconfig" / "portsentry").write_text(f"PORTSENTRY={command}\n")
    sysv = str(REPO_ROOT / "packaging" / "sysv" / "portsentry")
    in_root = root.wrap(["sh", "-c", f"mkdir -p /etc/sysconfig && mount --bind {root.base}/sysconfig "
                                     f'/etc/sysconfig && exec sh {sysv} "$1"', "sh", "start"])
    pid_file = root.run / "portsentry.pid"
    pid = None
    try:
        started = run_in(namespaces.target, in_root, env=daemon_env(), timeout=60)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "Starting portsentry" in started.stdout
        syslog.wait_for(READY_TEXT, timeout=30)
        pid = int(pid_file.read_text())
        assert_debian_modes(syslog)

        def init(action: str) -> subprocess.CompletedProcess[str]:
            return run_in(namespaces.target, enter(pid, ["sh", sysv, action]), env=daemon_env(), timeout=90)

        status = init("status")
        assert status.returncode == 0 and f"portsentry is running (pid {pid})" in status.stdout, status
        mark = syslog.mark()
        assert init("reload").returncode == 0
        syslog.wait_for("PortSentry reloaded its configuration", since=mark)
        stopped = init("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        eventually(lambda: not Path(f"/proc/{pid}").exists(), what="the daemon gone")
        assert not pid_file.exists()
        syslog.wait_for("PortSentry is shutting down", since=mark)
        assert run_in(namespaces.target, root.wrap(["sh", sysv, "status"])).returncode == 3
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_the_sysv_script_leaves_alone_a_process_that_took_a_dead_daemon_s_pid(tmp_path):
    """A daemon killed outright (SIGKILL, the OOM killer) leaves its pid file behind, and on a
    SysV host (pid_max 32768) its pid is soon another process's. The script took any live pid
    from the file for the daemon's: `status` said running, `start` refused to start, and `stop`
    sent that process SIGTERM, then SIGKILL. The daemon holds a lock on its pid file while it
    runs (as the logrotate snippet already checks); without it the file is stale."""
    if shutil.which("flock") is None:
        pytest.skip("flock (util-linux) is missing")
    root = PrivateRoot(tmp_path / "root")
    sysv = shlex.quote(str(REPO_ROOT / "packaging" / "sysv" / "portsentry"))
    script = (f"sleep 60 & other=$!\n"
              f"echo $other > /run/portsentry.pid\n"
              f"sh {sysv} status; echo \"status exit $?\"\n"
              f"sh {sysv} stop; echo \"stop exit $?\"\n"
              f"if kill -0 $other 2>/dev/null; then echo 'other alive'; kill $other; fi\n")
    done = subprocess.run(root.wrap(["sh", "-c", script]), capture_output=True, text=True, timeout=120,
                          check=False)
    assert "status exit 3" in done.stdout and "stop exit 0" in done.stdout, done.stdout + done.stderr
    assert "other alive" in done.stdout, done.stdout + done.stderr
    assert "Stopping portsentry" not in done.stdout
    assert not (root.run / "portsentry.pid").exists()  # the stale file goes, as after a clean stop
