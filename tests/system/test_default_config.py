"""The README's run command: the daemon on the embedded default config, in the foreground."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tests.system.rig import REPO_ROOT, daemon_env, ns_argv, run_in, stop_process


def test_embedded_default_answers_a_local_connect_as_ignored(namespaces, syslog, tmp_path):
    net = namespaces
    default_blocked = "/var/lib/portsentry/portsentry.blocked.tcp"
    existed = os.path.exists(default_blocked)
    # A private mount namespace keeps the default paths (/var/lib/portsentry, /etc/portsentry)
    # away from the machine's own: tmpfs over /var/lib and /run, an empty dir over /etc/portsentry.
    empty = tmp_path / "empty"
    empty.mkdir()
    hide_etc = (f"mount --bind {shlex.quote(str(empty))} /etc/portsentry && "
                if os.path.isdir("/etc/portsentry") else "")
    # The README's run command (scripts/run) is setup + `portsentry --log-stderr -tcp -udp`; setup
    # cannot run under the tmpfs (it hides dpkg's state), so the daemon is started directly.
    daemon = (f"{shlex.quote(sys.executable)} -m portsentry --log-stderr -v "
              f"--syslog-socket {shlex.quote(str(syslog.path))} -tcp -udp")
    script = f"mount -t tmpfs tmpfs /var/lib && mount -t tmpfs tmpfs /run && {hide_etc}exec {daemon}"
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            ns_argv(net.target, ["unshare", "-m", "--propagation", "private", "sh", "-c", script]),
            stdout=subprocess.DEVNULL, stderr=err, env=daemon_env(), cwd=REPO_ROOT)
    try:
        syslog.wait_for("adminalert: PortSentry is now active and listening.", timeout=20)
        syslog.wait_for("adminalert: Going into listen mode on TCP port: 1")
        syslog.wait_for("adminalert: Going into listen mode on UDP port: 1")
        connect = "import socket; socket.create_connection(('127.0.0.1', 1)).close()"
        assert run_in(net.target, [sys.executable, "-c", connect]).returncode == 0
        syslog.wait_for("attackalert: Host: 127.0.0.1 found in ignore file, aborting actions")
        syslog.assert_absent("has been blocked", wait=1.0)
        deadline = time.monotonic() + 5
        while b"found in ignore file" not in stderr_path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"attackalert: Host: 127.0.0.1 found in ignore file" in stderr_path.read_bytes()
    finally:
        rc, killed = stop_process(proc, timeout=10)
    assert not killed and rc == 0, Path(stderr_path).read_text()
    syslog.wait_for("adminalert: PortSentry is shutting down")
    # Nothing leaked out of the private mount namespace.
    assert os.path.exists(default_blocked) == existed
