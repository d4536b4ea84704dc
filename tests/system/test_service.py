"""The service files: the systemd unit passes `systemd-analyze verify` and stays hardened, its
command lines are ones our CLI accepts, and the daemon started the way the unit starts it tells
systemd it is ready (sd_notify), reloading and stopping."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portsentry.config import Config
from tests.system.rig import (
    REPO_ROOT,
    Namespaces,
    daemon_env,
    popen_in,
    short_socket_dir,
    stop_process,
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
    # 2.8 when written; 10 is "UNSAFE". A rise means a hardening line went missing.
    assert float(match.group(1)) <= 3.5, proc.stdout


def test_unit_settings_match_the_daemon() -> None:
    assert SETTINGS["Type"] == ["notify"]
    assert SETTINGS["ExecStart"] == [f"{INSTALLED_COMMAND} -tcp -udp -atcp -audp"]
    assert SETTINGS["ExecStartPre"][0].startswith(f"{INSTALLED_COMMAND} check-config")
    assert SETTINGS["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(SETTINGS["CapabilityBoundingSet"][0].split()) == caps
    assert set(SETTINGS["AmbientCapabilities"][0].split()) == caps
    assert set(SETTINGS["RestrictAddressFamilies"][0].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert SETTINGS[key] == ["yes"], key
    assert SETTINGS["ProtectSystem"] == ["strict"]
    # The directories systemd makes for us are the ones the daemon uses by default.
    defaults = Config(source="(defaults)")
    assert defaults.state_dir == "/var/lib/" + SETTINGS["StateDirectory"][0]
    assert os.path.dirname(defaults.control_socket) == "/run/" + SETTINGS["RuntimeDirectory"][0]
    hosts_deny_dir = os.path.dirname(defaults.hosts_deny_file)
    assert any(path.lstrip("-") in (defaults.hosts_deny_file, hosts_deny_dir)
               for path in SETTINGS["ReadWritePaths"][0].split())


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
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._messages: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
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
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()


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
