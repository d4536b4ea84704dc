"""The systemd unit's file-system sandbox lets through what the daemon's bans need.

No systemd here runs the unit, so its file-system lines are played as systemd plays them, in a
private mount namespace (tests/system/privateroot.py) inside the test's network namespace: the
`+` ExecStartPre lines first, outside the sandbox; then every ReadWritePaths= entry that exists is
bound writable onto itself, and /etc and /run become read-only around them (ProtectSystem=strict,
RuntimeDirectory= making /run/portsentry only). Nothing of the host's /etc or /run is touched.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from tests.system.privateroot import PrivateRoot
from tests.system.rig import run_in
from tests.system.test_service import SETTINGS


def sandboxed(commands: str) -> str:
    """A shell script: the unit's outside-the-sandbox preparations, its sandbox, then `commands`."""
    prepare = [line[1:] for line in SETTINGS["ExecStartPre"] if line.startswith("+")]
    writable = [path.lstrip("-") for line in SETTINGS["ReadWritePaths"] for path in line.split()]
    lines = ["set -e", *prepare]
    lines += [f"if [ -e {shlex.quote(path)} ]; then mount --bind {shlex.quote(path)} {shlex.quote(path)}; fi"
              for path in writable]
    lines += ["mount -o remount,bind,ro /etc", "mount -o remount,bind,ro /run", commands]
    return "\n".join(lines)


def test_iptables_legacy_runs_in_the_unit_s_sandbox(namespaces, tmp_path: Path) -> None:
    # iptables-legacy (the ipset backend's rules, an iptables KILL_ROUTE) takes /run/xtables.lock
    # before it does anything, creating it when missing. ProtectSystem=strict leaves /run
    # read-only but for /run/portsentry, so every such command failed under the unit with
    # "Fatal: can't open lock file /run/xtables.lock: Read-only file system" (exit 4): no ban.
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (Debian package iptables)")
    root = PrivateRoot(tmp_path / "root")
    script = sandboxed(
        "touch /etc/portsentry-sandbox-probe 2>/dev/null && { echo '/etc is writable'; exit 9; }\n"
        "echo 'ALL: 198.18.0.9' >> /etc/hosts.deny\n"
        "iptables-legacy -w -A INPUT -s 198.18.0.9 -j DROP\n"
        "ip6tables-legacy -w -A INPUT -s fd00:18::9 -j DROP\n"
        "iptables-legacy -w -S INPUT\n")
    done = run_in(namespaces.target, root.wrap(["sh", "-c", script]), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-A INPUT -s 198.18.0.9/32 -j DROP" in done.stdout
    # The lock was made by the unit's own preparation, as iptables makes it: root's, 0600.
    lock = root.run / "xtables.lock"
    assert lock.is_file() and lock.stat().st_mode & 0o777 == 0o600
    assert not Path("/etc/portsentry-sandbox-probe").exists()
