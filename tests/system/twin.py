"""Debian's PortSentry 1.2 and ours, one after the other, on the same configuration and the same
traffic, and what each left where an admin and fail2ban look: syslog lines, history and blocked
files, hosts.deny, the commands run.

Each side runs in a private mount namespace inside the test's target network namespace
(tests/system/privateroot.py): /etc, /var and /dev are overlays whose writable layers are the
side's own directories, /var/lib/portsentry and /run are empty directories of the side, and the
side's syslog receiver is bind-mounted on /dev/log, where 1.2 has its socket compiled in. So both
read the very same /etc/portsentry/portsentry.conf with Debian's paths, and nothing reaches the
host's files. Killing what runs in the target namespace (the rig's teardown) ends both daemons,
the commands they ran and their mount namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.system.privateroot import PrivateRoot, enter
from tests.system.rig import (
    READY_TEXT,
    REPO_ROOT,
    Namespaces,
    RigError,
    SyslogReceiver,
    daemon_env,
    popen_in,
    run_in,
    stop_process,
)

DEBIAN_BINARY = REPO_ROOT / ".cache" / "debian-portsentry" / "usr" / "sbin" / "portsentry"
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch-debian-portsentry"
CONF = "/etc/portsentry/portsentry.conf"
# Debian's paths, the same for both sides (each sees its own /var/lib/portsentry).
PATHS = {
    "IGNORE_FILE": "/etc/portsentry/portsentry.ignore",
    "HISTORY_FILE": "/var/lib/portsentry/portsentry.history",
    "BLOCKED_FILE": "/var/lib/portsentry/portsentry.blocked",
}
# Where the test's commands write what they were given (see `record_command`).
COMMANDS_FILE = "/var/lib/portsentry/commands"

_HISTORY = re.compile(r"^(?P<epoch>\d+) - (?P<local>\d\d/\d\d/\d{4} \d\d:\d\d:\d\d) (?P<rest>Host: .*)$")


def record_command(word: str) -> str:
    """A KILL_ROUTE / KILL_RUN_CMD that appends its own substituted arguments to COMMANDS_FILE,
    so the test sees which commands ran, in what order and with what substitutions."""
    return f"/bin/echo {word} $TARGET$ $PORT$ $MODE$ >> {COMMANDS_FILE}"


def ensure_debian_binary() -> Path:
    if not DEBIAN_BINARY.is_file():
        done = subprocess.run([str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=300,
                              check=False)
        if done.returncode != 0 or not DEBIAN_BINARY.is_file():
            raise RigError(f"could not fetch Debian's portsentry (exit {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    return DEBIAN_BINARY


def config_text(settings: dict[str, str]) -> str:
    return "".join(f'{key}="{value}"\n' for key, value in {**PATHS, **settings}.items())


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one side left. History and blocked lines have their time stamps replaced by
    `<time>` (after checking that the epoch and the local time agree)."""

    syslog: tuple[str, ...]
    history: tuple[str, ...]
    blocked: dict[str, tuple[str, ...]]
    hosts_deny: tuple[str, ...]
    commands: tuple[str, ...]
    replies: tuple[str, ...] = field(default=())
    # (syslog PRI, ident) of every line: 1.2 logs daemon.notice as "portsentry".
    identities: frozenset[tuple[int, str]] = frozenset()


def without_time(line: str) -> str:
    """`<epoch> - MM/DD/YYYY HH:MM:SS Host: ...` -> `<time> Host: ...`; fails on any other shape
    or when the two stamps disagree (both are the daemon's local time of one instant)."""
    m = _HISTORY.match(line)
    if m is None:
        raise AssertionError(f"not a 1.2 history line: {line!r}")
    local = time.strftime("%m/%d/%Y %H:%M:%S", time.localtime(int(m["epoch"])))
    if local != m["local"]:
        raise AssertionError(f"epoch and local time disagree in {line!r} (expected {local})")
    return f"<time> {m['rest']}"


def _lines(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return ()
    return tuple(path.read_text(errors="replace").splitlines())


class Side:
    """One implementation with its own private root under `base` and its own syslog receiver."""

    name = "?"

    def __init__(self, net: Namespaces, base: Path, syslog: SyslogReceiver) -> None:
        self.net, self.base, self.syslog = net, base, syslog
        self.root = PrivateRoot(base / "root")
        for sub in ("dev-upper", "dev-work"):
            (self.root.base / sub).mkdir()
        self.replies: list[str] = []

    def wrap(self, argv: Sequence[str]) -> list[str]:
        base = shlex.quote(str(self.root.base))
        sock = shlex.quote(str(self.syslog.path))
        prologue = (
            self.root.prologue()
            + f"mount -t overlay overlay -o lowerdir=/dev,upperdir={base}/dev-upper,"
              f"workdir={base}/dev-work /dev\n"
            + f"touch /dev/log && mount --bind {sock} /dev/log\n"
            # Never write the host's /etc: stop unless the overlay really is there.
            + "mountpoint -q /etc && mountpoint -q /var/lib/portsentry\n"
        )
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", prologue + 'exec "$@"',
                "sh", *argv]

    def write_files(self, config: str, ignore: Sequence[str], etc: dict[str, str]) -> None:
        (self.root.etc / "portsentry.conf").write_text(config)
        (self.root.etc / "portsentry.ignore").write_text("".join(f"{e}\n" for e in ignore))
        for name, text in etc.items():
            (self.root.base / "etc-upper" / name).write_text(text)

    def start(self, modes: Sequence[str]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait_ready(self, since: int, alive: Callable[[], bool], timeout: float = 30.0) -> int:
        """The pid of the first readiness line from `since` on."""
        deadline = time.monotonic() + timeout
        while True:
            ready = [r for r in self.syslog.records(since) if READY_TEXT in r.message]
            if ready:
                return ready[0].pid or 0
            if not alive():
                raise RigError(f"{self.name} exited before it was ready\n{self.report()}")
            if time.monotonic() > deadline:
                raise RigError(f"{self.name} not ready after {timeout}s\n{self.report()}")
            self.syslog.wait_any(0.1)

    def report(self) -> str:
        err = ""
        for path in sorted(self.base.glob("*.err")):
            err += f"{path.name}:\n{path.read_text(errors='replace')[-3000:]}\n"
        return f"{err}syslog:\n{self.syslog.describe()}"

    def outcome(self) -> Outcome:
        lib = self.root.lib
        blocked = {p.name.rsplit(".", 1)[1]: tuple(without_time(x) for x in _lines(p))
                   for p in sorted(lib.glob("portsentry.blocked.*"))}
        return Outcome(
            syslog=tuple(self.syslog.messages()),
            history=tuple(without_time(x) for x in _lines(lib / "portsentry.history")),
            blocked=blocked,
            hosts_deny=_lines(self.root.base / "etc-upper" / "hosts.deny"),
            commands=_lines(lib / "commands"),
            replies=tuple(self.replies),
            identities=frozenset((r.pri, r.ident) for r in self.syslog.records()),
        )


class Legacy(Side):
    """Debian's 1.2 binary: it forks, one process per mode, all in one mount namespace."""

    name = "1.2"

    def __init__(self, net: Namespaces, base: Path, syslog: SyslogReceiver) -> None:
        super().__init__(net, base, syslog)
        self.pids: list[int] = []

    def start(self, modes: Sequence[str]) -> None:
        binary = str(ensure_debian_binary())
        for mode in modes:
            since = self.syslog.mark()
            argv = ([binary, mode] if not self.pids else enter(self.pids[0], [binary, mode]))
            err = self.base / f"legacy{mode}.err"
            with err.open("wb") as out:
                launcher = subprocess.run(
                    ["ip", "netns", "exec", self.net.target, *(self.wrap(argv) if not self.pids else argv)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=30, check=False)
            if launcher.returncode != 0:
                raise RigError(f"1.2 {mode} did not start (exit {launcher.returncode})\n{self.report()}")
            self.pids.append(self.wait_ready(since, self._not_shut_down(since)))

    def _not_shut_down(self, since: int) -> Callable[[], bool]:
        """It forks and the parent exits: a failed start shows as its shutdown line."""
        return lambda: self.syslog.find("PortSentry is shutting down", since) is None

    def stop(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while Path(f"/proc/{pid}").exists():
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    raise RigError(f"1.2 (pid {pid}) ignored SIGTERM")
                time.sleep(0.02)
        self.pids = []


class Ours(Side):
    """This PortSentry, in the foreground, all modes in one process, logging to /dev/log."""

    name = "ours"

    def __init__(self, net: Namespaces, base: Path, syslog: SyslogReceiver) -> None:
        super().__init__(net, base, syslog)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, modes: Sequence[str]) -> None:
        since = self.syslog.mark()
        err = (self.base / "ours.err").open("wb")
        argv = [sys.executable, "-m", "portsentry", "-c", CONF, *modes]
        self.proc = popen_in(self.net.target, self.wrap(argv), stdout=err, stderr=err, env=daemon_env())
        err.close()
        proc = self.proc
        self.wait_ready(since, lambda: proc.poll() is None)

    def stop(self) -> None:
        if self.proc is not None:
            code, killed = stop_process(self.proc, timeout=10)
            self.proc = None
            if killed:
                raise RigError(f"ours ignored SIGTERM\n{self.report()}")
            if code != 0:
                raise RigError(f"ours exited {code}\n{self.report()}")


def settle(syslog: SyslogReceiver, quiet: float = 0.4, timeout: float = 15.0) -> None:
    """Wait until `syslog` has had no new line for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    count = syslog.mark()
    still_since = time.monotonic()
    while True:
        time.sleep(0.05)
        now = syslog.mark()
        if now != count:
            count, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return
        if time.monotonic() > deadline:
            raise RigError(f"syslog still busy after {timeout}s:\n{syslog.describe()}")


def hping(ns: str, target: str, port: int, flags: Sequence[str], *, udp: bool = False) -> None:
    """One packet with the given hping3 flags (-S -F -P -U ...; none for a NULL probe)."""
    argv = ["hping3", "-q", "-c", "1", *(["--udp"] if udp else flags), "-p", str(port), target]
    run_in(ns, argv, timeout=15)
