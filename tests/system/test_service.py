"""The service files: the systemd unit passes `systemd-analyze verify` and stays hardened, its
command lines are ones our CLI accepts, and the daemon started the way the unit starts it tells
systemd it is ready (sd_notify), reloading and stopping. However it is started, the daemon keeps
only the network capabilities, and so do the commands it runs; its pid file is its own."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portsentry.config.settings import Config
from portsentry.host.privileges import KEPT, CapabilitySets, names, read_status
from portsentry.journal.receiver import DatagramReceiver
from tests.system.rig import (
    REPO_ROOT,
    DaemonFactory,
    Namespaces,
    daemon_env,
    eventually,
    popen_in,
    short_socket_dir,
    stop_process,
    tcp_connect,
)

UNIT = REPO_ROOT / "packaging" / "systemd" / "portsentry.service"
INSTALLED_COMMAND = "/usr/bin/portsentry"
# Debian package that provides systemd-analyze (scripts/setup should install it).
SYSTEMD_ANALYZE_PACKAGE = "systemd"


def unit_settings(text: str) -> dict[str, list[str]]:
    """KEY -> values of every assignment in the unit (sections flattened; ours repeat no key
    across sections)."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


SETTINGS = unit_settings(UNIT.read_text())


def portsentry_command(directory: Path) -> str:
    """The venv's `portsentry` script, or (when the package is not installed, e.g. PYTHONPATH=src)
    a wrapper that runs this interpreter's `-m portsentry`."""
    installed = Path(sys.executable).parent / "portsentry"
    if installed.is_file() and os.access(installed, os.X_OK):
        return str(installed)
    wrapper = directory / "portsentry"
    wrapper.write_text(
        f"#!/bin/sh\nPYTHONPATH={REPO_ROOT / 'src'} exec {sys.executable} -m portsentry \"$@\"\n"
    )
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose commands point at this checkout's portsentry (verify checks that
    every command exists, and /usr/bin/portsentry need not)."""
    command = portsentry_command(tmp_path)
    copy = tmp_path / "portsentry.service"
    copy.write_text(UNIT.read_text().replace(INSTALLED_COMMAND, command))
    return copy


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip(f"systemd-analyze is missing (Debian package {SYSTEMD_ANALYZE_PACKAGE!r})")
    return tool


def test_unit_passes_systemd_analyze_verify(local_unit: Path) -> None:
    proc = subprocess.run([systemd_analyze(), "verify", str(local_unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    output = proc.stdout + proc.stderr
    # verify exits 0 on unknown keys and bad values, only warning: any line about our unit fails.
    ours = [line for line in output.splitlines() if "portsentry" in line]
    assert proc.returncode == 0 and not ours, f"systemd-analyze verify:\n{output}"


def test_unit_stays_hardened(local_unit: Path) -> None:
    proc = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--no-pager", str(local_unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    if match is None and "offline" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()}")
    assert match is not None, f"no exposure level in:\n{proc.stdout}\n{proc.stderr}"
    # 2.8 when written, 2.3 since issue 9 (docs/service.md); 10 is "UNSAFE". A rise means a
    # hardening line went missing.
    assert float(match.group(1)) <= 2.3, proc.stdout


def test_unit_settings_match_the_daemon() -> None:
    assert SETTINGS["Type"] == ["notify"]
    assert SETTINGS["ExecStart"] == [
        f"{INSTALLED_COMMAND} --debian-defaults /etc/default/portsentry -tcp -udp -atcp -audp"]
    assert SETTINGS["ExecStartPre"][0].startswith(f"{INSTALLED_COMMAND} check-config")
    assert SETTINGS["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(SETTINGS["CapabilityBoundingSet"][0].split()) == caps
    # The daemon drops to the same set when started without systemd.
    assert set(names(KEPT).split()) == caps
    # Root gets its bounding set on execve; ambient capabilities would only widen the exposure.
    assert "AmbientCapabilities" not in SETTINGS
    assert set(SETTINGS["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts"):
        assert SETTINGS[key] == ["yes"], key
    assert SETTINGS["ProtectSystem"] == ["strict"]
    # The directories systemd makes for us are the ones the daemon uses by default.
    defaults = Config(source="(defaults)")
    assert defaults.state_dir == "/var/lib/" + SETTINGS["StateDirectory"][0]
    assert os.path.dirname(defaults.control_socket) == "/run/" + SETTINGS["RuntimeDirectory"][0]
    # The files outside those directories that the daemon (and iptables-legacy, which takes its
    # lock first) writes; not /etc, not /run (tests/system/test_unit_sandbox.py plays them).
    assert SETTINGS["ReadWritePaths"] == [f"-{defaults.hosts_deny_file} -/run/xtables.lock"]


def hosts_deny_creator() -> str:
    """The ExecStartPre script that creates a missing hosts.deny outside the sandbox."""
    (command,) = [line for line in SETTINGS["ExecStartPre"] if "hosts.deny" in line]
    prefix = "+/bin/sh -c '"
    assert command.startswith(prefix) and command.endswith("'"), command
    return command[len(prefix):-1]


def test_unit_creates_a_missing_hosts_deny_before_the_sandbox_needs_it() -> None:
    # The config check comes first, the creation second, both before ExecStart.
    assert SETTINGS["ExecStartPre"][0].startswith(f"{INSTALLED_COMMAND} check-config")
    assert "/etc/hosts.deny" in SETTINGS["ExecStartPre"][1]
    assert Config(source="(defaults)").hosts_deny_file in hosts_deny_creator()


def run_creator(path: Path) -> None:
    script = hosts_deny_creator().replace("/etc/hosts.deny", str(path))
    # umask 077 as the unit has: the script must still make the file world-readable (tcpd).
    subprocess.run(["/bin/sh", "-c", f"umask 077; {script}"], check=True, timeout=10)


def test_hosts_deny_creator_makes_an_empty_world_readable_file(tmp_path: Path) -> None:
    deny = tmp_path / "hosts.deny"
    run_creator(deny)
    assert deny.read_bytes() == b""
    assert deny.stat().st_mode & 0o777 == 0o644


def test_hosts_deny_creator_leaves_an_existing_file_alone(tmp_path: Path) -> None:
    deny = tmp_path / "hosts.deny"
    deny.write_text("ALL: 198.18.0.2\n")
    deny.chmod(0o640)
    before = deny.stat()
    time.sleep(0.01)
    run_creator(deny)
    after = deny.stat()
    assert deny.read_text() == "ALL: 198.18.0.2\n"
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (before.st_ino, before.st_mode,
                                                                before.st_mtime_ns)


def test_hosts_deny_creator_does_not_follow_a_symlink(tmp_path: Path) -> None:
    deny = tmp_path / "hosts.deny"
    deny.symlink_to(tmp_path / "elsewhere")
    run_creator(deny)
    assert deny.is_symlink() and not (tmp_path / "elsewhere").exists()


def write_config(directory: Path, sockets: Path) -> Path:
    conf = directory / "portsentry.conf"
    (directory / "portsentry.ignore").write_text("127.0.0.1/32\n")
    (directory / "hosts.deny").touch()
    settings = {
        "TCP_PORTS": "1",
        "UDP_PORTS": "1",
        "ADVANCED_PORTS_TCP": "1024",
        "ADVANCED_PORTS_UDP": "1024",
        "IGNORE_FILE": directory / "portsentry.ignore",
        "HISTORY_FILE": directory / "portsentry.history",
        "BLOCKED_FILE": directory / "portsentry.blocked",
        "HOSTS_DENY_FILE": directory / "hosts.deny",
        "STATE_DIR": directory / "state",
        "CONTROL_SOCKET": sockets / "control.sock",
        "BLOCK_TCP": "0",
        "BLOCK_UDP": "0",
    }
    conf.write_text("".join(f'{key}="{value}"\n' for key, value in settings.items()))
    return conf


def test_unit_check_config_line_accepts_the_unit_modes(tmp_path: Path) -> None:
    """ExecStartPre as written (plus -c, since /etc/portsentry is not ours to use here)."""
    sockets = short_socket_dir()
    try:
        conf = write_config(tmp_path, sockets)
        argv = SETTINGS["ExecStartPre"][0].split()
        argv[0] = portsentry_command(tmp_path)
        proc = subprocess.run([*argv, "-c", str(conf)], capture_output=True, text=True,
                              timeout=60, check=False, env=daemon_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "configuration OK" in proc.stdout
    finally:
        shutil.rmtree(sockets, ignore_errors=True)


class NotifySocket:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET, collecting what arrives.
    A filesystem path, not '@abstract': abstract sockets belong to a network namespace, and the
    daemon runs in another one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._messages: list[str] = []
        self._cond = threading.Condition()
        self._receiver = DatagramReceiver(path, self._keep, name="notify-socket")

    def _keep(self, data: bytes, _at: float) -> None:
        with self._cond:
            self._messages.append(data.decode(errors="replace"))
            self._cond.notify_all()

    def messages(self) -> list[str]:
        with self._cond:
            return list(self._messages)

    def wait_for(self, check: Callable[[str], bool], since: int = 0, timeout: float = 10.0) -> int:
        """Index of the first message from `since` on that `check` accepts."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for index in range(since, len(self._messages)):
                    if check(self._messages[index]):
                        return index
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching notification within {timeout}s; "
                                         f"got {self._messages}")
                self._cond.wait(left)

    def close(self) -> None:
        self._receiver.close()


def assignments(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


class UnitLikeDaemon:
    """`portsentry -c CONF --no-syslog -tcp` in the target namespace with NOTIFY_SOCKET set, as
    systemd would start it (foreground, no --daemon)."""

    def __init__(self, net: Namespaces, workdir: Path, sockets: Path, notify: NotifySocket) -> None:
        self.conf = write_config(workdir, sockets)
        self.stderr_path = workdir / "daemon.stderr"
        env = daemon_env()
        env["NOTIFY_SOCKET"] = str(notify.path)
        self._stderr = self.stderr_path.open("wb")
        self.proc = popen_in(
            net.target,
            [sys.executable, "-m", "portsentry", "-c", str(self.conf), "--no-syslog",
             "--log-stderr", "-tcp"],
            stdout=self._stderr, stderr=self._stderr, env=env,
        )

    def report(self) -> str:
        self._stderr.flush()
        return f"exit: {self.proc.poll()}\nstderr:\n{self.stderr_path.read_text(errors='replace')}"

    def stop(self) -> tuple[int, bool]:
        result = stop_process(self.proc, timeout=10.0)
        self._stderr.close()
        return result


@pytest.fixture
def unit_daemon(namespaces: Namespaces, tmp_path: Path) -> Iterator[tuple[UnitLikeDaemon, NotifySocket]]:
    sockets = short_socket_dir()
    notify = NotifySocket(sockets / "notify")
    daemon = UnitLikeDaemon(namespaces, tmp_path, sockets, notify)
    try:
        yield daemon, notify
    finally:
        daemon.stop()
        notify.close()
        shutil.rmtree(sockets, ignore_errors=True)


def test_daemon_started_like_the_unit_reports_ready(
    unit_daemon: tuple[UnitLikeDaemon, NotifySocket],
) -> None:
    daemon, notify = unit_daemon
    try:
        notify.wait_for(lambda m: assignments(m).get("READY") == "1", timeout=10.0)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{daemon.report()}") from None
    assert daemon.proc.poll() is None, daemon.report()


def test_daemon_reports_reload_and_stop(unit_daemon: tuple[UnitLikeDaemon, NotifySocket]) -> None:
    daemon, notify = unit_daemon
    try:
        ready = notify.wait_for(lambda m: assignments(m).get("READY") == "1", timeout=10.0)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(lambda m: assignments(m).get("RELOADING") == "1", ready + 1)
        usec = int(assignments(notify.messages()[reloading])["MONOTONIC_USEC"])
        # Both clocks are CLOCK_MONOTONIC, which network namespaces share.
        assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notify.wait_for(lambda m: assignments(m).get("READY") == "1", reloading + 1)
        assert daemon.proc.poll() is None
        daemon.proc.send_signal(signal.SIGTERM)
        notify.wait_for(lambda m: assignments(m).get("STOPPING") == "1", reloading + 1)
        assert daemon.proc.wait(10.0) == 0
    except AssertionError as error:
        raise AssertionError(f"{error}\n{daemon.report()}") from None


# --- capabilities, however the daemon is started -------------------------------------------------

KEPT_MASK = sum(1 << cap for cap in KEPT)


def over_the_kept_set(sets: CapabilitySets) -> str:
    extra = (sets.effective | sets.permitted | sets.inheritable | sets.bounding) & ~KEPT_MASK
    return names(extra) if extra else ""


def test_daemon_and_the_commands_it_runs_keep_only_the_network_capabilities(
    daemon_factory: DaemonFactory, namespaces: Namespaces, tmp_path: Path,
) -> None:
    """Started as root without systemd: every thread, and a KILL_RUN_CMD's shell, are limited."""
    caps_out = tmp_path / "command-caps"
    daemon = daemon_factory("-tcp", BLOCK_TCP="2",
                            KILL_RUN_CMD=f"grep ^Cap /proc/self/status > {caps_out}")
    assert tcp_connect(namespaces.scanner, namespaces.target_ip4, 1).connected
    eventually(lambda: caps_out.exists() and "CapBnd" in caps_out.read_text(),
               what="KILL_RUN_CMD wrote its capabilities")
    command = read_status(str(caps_out))
    assert command.permitted == command.bounding == KEPT_MASK, daemon.report()
    assert not over_the_kept_set(command)
    # Every thread, including the responder pool that ran the command.
    tasks = sorted(Path(f"/proc/{daemon.pid}/task").iterdir())
    assert len(tasks) > 1
    for task in tasks:
        sets = read_status(str(task / "status"))
        assert not over_the_kept_set(sets), f"{task}: {over_the_kept_set(sets)}"
        assert sets.permitted == KEPT_MASK, task


# --- the pid file ---------------------------------------------------------------------------------


def test_second_daemon_with_the_same_pid_file_refuses_to_start(
    daemon_factory: DaemonFactory, tmp_path: Path,
) -> None:
    pid_file = tmp_path / "portsentry.pid"
    first = daemon_factory("-tcp", extra_args=["--pid-file", str(pid_file)])
    assert pid_file.read_text() == f"{first.pid}\n"
    second = daemon_factory("-tcp", start=False, extra_args=["--pid-file", str(pid_file)])
    second.start(wait_ready=False)
    assert second.wait_exit(15) == 1, second.report()
    assert (f"portsentry: {pid_file}: another portsentry (pid {first.pid}) holds this pid file; "
            "refusing to start a second daemon with it") in second.stderr_text()
    assert first.running and pid_file.read_text() == f"{first.pid}\n"
    assert first.stop() == 0
    assert not pid_file.exists()


def test_daemon_refuses_a_symlinked_pid_file(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("not a pid file\n")
    pid_file = tmp_path / "portsentry.pid"
    pid_file.symlink_to(victim)
    daemon = daemon_factory("-tcp", start=False, extra_args=["--pid-file", str(pid_file)])
    daemon.start(wait_ready=False)
    assert daemon.wait_exit(15) == 1, daemon.report()
    assert f"{pid_file}: refusing to use a symlink as the pid file" in daemon.stderr_text()
    assert victim.read_text() == "not a pid file\n"
