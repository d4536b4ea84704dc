"""What both demos (`portsentry demo`, cli.demo, and `portsentry demo --fleet`, cli.demo_fleet)
stand on: the syslog socket the daemons log to, nmap's output read back, the daemon's
environment, and the clean-up that removes every process and namespace a demo made, whether it
ends, fails or is interrupted."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from portsentry.journal.receiver import DatagramReceiver

COMMAND_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
EXIT_OK, EXIT_FAILED, EXIT_UNAVAILABLE = 0, 1, 2
READY_TEXT = "PortSentry is now active and listening."
# Longest path a Unix socket can bind (sun_path is 108 bytes including the NUL).
MAX_UNIX_PATH = 107
REQUIRED_TOOLS = (("ip", "iproute2"), ("nmap", "nmap"))

# ASCII digits, and few of them: int() refuses 4,300 digits, and a pid or a port never has many.
_SYSLOG_LINE = re.compile(
    r"^<([0-9]{1,3})>(\w{3} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2}) ([^\[:]+)\[([0-9]{1,10})\]: (.*)$",
    re.DOTALL)
_NMAP_PORT_LINE = re.compile(r"^([0-9]{1,5})/tcp\s+(\S+)", re.MULTILINE)


class StepFailed(Exception):
    """A demo step did not happen (in time); the message says what was expected."""

    reported = False


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: a KeyboardInterrupt so every `finally` and subprocess.run cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class SyslogLine:
    """One datagram the daemon sent to our syslog socket."""

    pid: int
    message: str


def parse_syslog(data: bytes) -> SyslogLine | None:
    """`<29>Mon dd hh:mm:ss portsentry[pid]: message` -> SyslogLine; None for anything else."""
    match = _SYSLOG_LINE.match(data.decode("utf-8", "replace").rstrip("\0\n"))
    if match is None:
        return None
    return SyslogLine(pid=int(match.group(4)), message=match.group(5))


def nmap_ports(output: str) -> dict[int, str]:
    """Port -> state ("closed", "filtered", ...) from nmap's normal output."""
    return {int(m.group(1)): m.group(2) for m in _NMAP_PORT_LINE.finditer(output) if int(m.group(1)) <= 65535}


def nmap_table(output: str) -> list[str]:
    """The port table nmap prints (header and one line per port)."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("PORT"):
            table = [line]
            table += [row for row in lines[i + 1 :] if _NMAP_PORT_LINE.match(row)]
            return table
    return [row for row in lines if row.startswith("Not shown") or "filtered" in row] or ["(no port table)"]


def unavailable_reason() -> str | None:
    """Why the demo cannot run here (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return ("portsentry demo must run as root: it creates network namespaces and watches raw "
                "packets (try: sudo portsentry demo)")
    for tool, package in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            return f"portsentry demo needs `{tool}`, which is not installed (Debian: apt install {package})"
    return None


class SyslogReceiver:
    """A Unix datagram socket the daemon logs to; a thread only queues lines, so the daemon never
    blocks on a full socket while the narrator is busy running nmap."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: queue.Queue[SyslogLine] = queue.Queue()
        self._receiver = DatagramReceiver(path, self._keep, name="psdemo-syslog")

    def _keep(self, data: bytes, _at: float) -> None:
        line = parse_syslog(data)
        if line is not None:
            self.lines.put(line)

    def close(self) -> None:
        self._receiver.close()


def package_env() -> dict[str, str]:
    """The environment for the daemon: it must import this very copy of the package, installed
    or run from a source tree."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def temp_dir(run_id: str) -> Path:
    """A private directory whose socket path fits AF_UNIX even when TMPDIR is long."""
    base = tempfile.gettempdir()
    if len(os.path.join(base, f"{run_id}-xxxxxxxx", "syslog.sock")) > MAX_UNIX_PATH:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=base))



def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)


def remove_namespace(ns: str) -> list[str]:
    """Kill what is left inside `ns`, then delete it; what could not be done."""
    if not Path("/run/netns", ns).exists():
        return []
    # `ip netns del` only unmounts the name: processes still inside would keep the network
    # (and its bans) alive, so anything left in there (a daemon child, an nmap) goes first.
    for _attempt in range(50):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False).stdout.split()
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.05)
    else:
        return [f"processes survive in namespace {ns}"]
    deleted = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT, check=False)
    if deleted.returncode != 0:
        return [f"could not delete namespace {ns}: {deleted.stderr.strip()}"]
    return []


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted for the duration (main thread only: elsewhere Python
    cannot install handlers, and the caller's own handling stays in charge)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short and leave namespaces behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
