"""The pieces the benchmark is built from: a timestamping syslog receiver, the two daemons under
test (ours and Debian's 1.2) started in a target namespace, /proc readings, and the scanners.

Everything runs inside network namespaces made by tests/system/rig.py; the only host paths written
are a private directory under /tmp. Debian's 1.2 reads /etc/portsentry/portsentry.conf and logs to
/dev/log, so it runs in a private mount namespace where /etc and /dev are overlays whose writable
layers live in that directory: the host's own /etc and /dev are never modified.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.system import rig
from tests.system.teardown import Shield

from portsentry.journal.receiver import SO_TIMESTAMPNS, DatagramReceiver
from portsentry.service import control

T = TypeVar("T")

REPO_ROOT = rig.REPO_ROOT
DEBIAN_BINARY = REPO_ROOT / ".cache" / "debian-portsentry" / "usr" / "sbin" / "portsentry"
DEBIAN_DOCS = REPO_ROOT / ".cache" / "debian-portsentry" / "usr" / "share" / "doc" / "portsentry"

KILL_ROUTE = "/sbin/ip route add blackhole $TARGET$"
# systemd's default (sysctl.d/50-default.conf); the kernel's own 10 would make the receiver, not the
# daemon, the bottleneck. Set only inside the target namespace, where the receiver socket lives.
SYSLOG_QUEUE = 512

DETECTION = re.compile(r" from host: (?P<name>\S+)/(?P<ip>\S+) to TCP port: (?P<port>\d+)")
BLOCKED = re.compile(r"attackalert: Host (?P<ip>\S+) has been blocked via ")
ALREADY = re.compile(r"attackalert: Host: (?P<name>\S+)/(?P<ip>\S+) is already blocked")
# Ours with the kernel path: probes of a banned source the kernel dropped, summed up per source.
KERNEL_SUMMARY = re.compile(r"is already blocked: (?P<count>\d+) more probes to watched ports dropped by "
                            r"the kernel")

_CLONE_NEWNET = 0x40000000
# The kernel stamps each datagram when it is sent (CLOCK_REALTIME), so a receiver thread that gets
# the CPU late does not stretch the measured times. All bench times are therefore time.time().
_TIMESPEC = struct.Struct("=qq")


class BenchError(RuntimeError):
    """A benchmark step failed; the message carries what is needed to see why."""


def require_root(prog: str) -> None:
    """Every bench tool creates network namespaces: without root it stops here, saying so."""
    if os.geteuid() != 0:
        print(f"{prog}: needs root (it creates network namespaces)", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Namespaces


def in_namespace(ns: str, make: Callable[[], T]) -> T:
    """Run `make` on a thread that has joined network namespace `ns` (setns affects only the
    calling thread), so sockets it creates belong to that namespace; nothing else moves."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=work, name=f"setns-{ns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def add_addresses(ns: str, dev: str, addresses: Sequence[str], prefix_len: int) -> None:
    for address in addresses:
        rig.run_in(ns, ["ip", "addr", "add", f"{address}/{prefix_len}", "dev", dev], check=True)


def link_counters(ns: str, dev: str) -> tuple[int, int]:
    """(rx_packets, tx_packets) of `dev` in `ns`."""
    base = Path("/sys/class/net") / dev / "statistics"
    out = rig.run_in(ns, ["cat", str(base / "rx_packets"), str(base / "tx_packets")], check=True)
    rx, tx = out.stdout.split()
    return int(rx), int(tx)


# ---------------------------------------------------------------------------------------------
# Syslog receiver


@dataclass(frozen=True, slots=True)
class Entry:
    """One datagram: when the daemon sent it (kernel stamp, time.time() scale) and its message
    ('' if not RFC 3164)."""

    at: float
    pid: int | None
    message: str


class Receiver:
    """A Unix datagram socket at `path`, created in `namespace` (whose datagram queue limit is
    raised), keeping every datagram with its kernel send stamp. Parsing waits until a reader asks,
    so the receiving loop stays short."""

    def __init__(self, path: Path, namespace: str) -> None:
        rig.run_in(namespace, ["sysctl", "-qw", f"net.unix.max_dgram_qlen={SYSLOG_QUEUE}"], check=True)

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind(os.fspath(path))
            return sock

        self.path = path
        self._raw: list[tuple[float, bytes]] = []
        self._parsed: list[Entry] = []
        self._lock = threading.Lock()
        self._receiver = DatagramReceiver(in_namespace(namespace, make), self._keep, name="bench-syslog")

    def _keep(self, data: bytes, at: float) -> None:
        with self._lock:
            self._raw.append((at, data))

    def entries(self, since: int = 0) -> list[Entry]:
        with self._lock:
            fresh = self._raw[len(self._parsed):]
        for at, data in fresh:
            record = rig.parse_syslog(data)
            self._parsed.append(Entry(at, record.pid if record else None,
                                      record.message if record else ""))
        return self._parsed[since:]

    def count(self) -> int:
        with self._lock:
            return len(self._raw)

    def last_sent(self) -> float | None:
        with self._lock:
            return self._raw[-1][0] if self._raw else None

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float, since: int = 0) -> Entry:
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.entries(since):
                if (pattern in entry.message if isinstance(pattern, str)
                        else pattern.search(entry.message)):
                    return entry
            if time.monotonic() > deadline:
                tail = "\n".join(f"  {e.message}" for e in self.entries()[-15:])
                raise BenchError(f"no syslog line matching {pattern!r} within {timeout}s; last:\n{tail}")
            time.sleep(0.002)

    def close(self) -> None:
        self._receiver.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# ---------------------------------------------------------------------------------------------
# /proc readings

_TICK = os.sysconf("SC_CLK_TCK")


def remove_rig(net: rig.Namespaces, receiver: Receiver | None, workdir: Path) -> None:
    """The end of a bench rig, whatever stopped it: its namespaces (and every process in them),
    the syslog receiver and the private directory, each even when the one before failed; an
    interrupt meanwhile waits until all three are done (Shield)."""
    with Shield():
        try:
            rig.destroy_namespaces(net.names)
        finally:
            if receiver is not None:
                receiver.close()
            shutil.rmtree(workdir, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system time of the process (all its threads) and of its waited-for children."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    # After the command name: state is field 3, utime/stime/cutime/cstime are fields 14-17.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return (utime + stime + cutime + cstime) / _TICK


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def rss_kib(pid: int) -> int:
    """Resident set size now (VmRSS)."""
    return _status_kib(pid, "VmRSS")


def control_socket(workdir: Path) -> Path:
    return workdir / "control.sock"


def daemon_status(path: Path, timeout: float = 10.0) -> dict[str, object]:
    """Our daemon's `status` answer over its control socket (one JSON line each way)."""
    try:
        data = control.exchange(os.fspath(path), b'{"command": "status"}\n', timeout)
    except (OSError, control.NotRunning) as error:
        raise BenchError(f"status from {path}: {error}") from error
    answer = json.loads(data or b"null")
    if not isinstance(answer, dict) or not isinstance(answer.get("status"), dict):
        raise BenchError(f"status from {path}: unexpected answer {answer!r}")
    status: dict[str, object] = answer["status"]
    return status


def settle(receiver: Receiver, pid: int, quiet: float = 1.0, timeout: float = 60.0) -> float:
    """Wait until the daemon has caught up: no syslog line for `quiet` seconds and no CPU used
    in the last half of that. Returns the CPU seconds reading at that point."""
    deadline = time.monotonic() + timeout
    last_cpu = cpu_seconds(pid)
    while True:
        time.sleep(quiet / 2)
        cpu = cpu_seconds(pid)
        last = receiver.last_sent()
        idle_log = last is None or time.time() - last >= quiet
        if idle_log and cpu == last_cpu:
            return cpu
        if time.monotonic() > deadline:
            raise BenchError(f"daemon {pid} still busy {timeout}s after the traffic stopped")
        last_cpu = cpu


# ---------------------------------------------------------------------------------------------
# The daemons under test


def config_text(workdir: Path, *, ours: bool, native: bool = False) -> str:
    """The one configuration both daemons get (1.2 ignores keys it does not know). With `native`
    ours blocks through its nftables backend instead of KILL_ROUTE (its capture is then NFLOG)."""
    settings = {
        "TCP_PORTS": rig.CLASSIC_TCP_PORTS,
        "UDP_PORTS": rig.CLASSIC_UDP_PORTS,
        "ADVANCED_PORTS_TCP": "1024",
        "ADVANCED_PORTS_UDP": "1024",
        "ADVANCED_EXCLUDE_TCP": "113,139",
        "ADVANCED_EXCLUDE_UDP": "520,138,137,67",
        "IGNORE_FILE": str(workdir / "portsentry.ignore"),
        "HISTORY_FILE": str(workdir / "portsentry.history"),
        "BLOCKED_FILE": str(workdir / "portsentry.blocked"),
        "RESOLVE_HOST": "0",
        "BLOCK_TCP": "1",
        "BLOCK_UDP": "0",
        "KILL_ROUTE": KILL_ROUTE,
        "SCAN_TRIGGER": "0",
    }
    if ours:
        # Keys only ours knows (1.2 would ignore them): keep every file of the run in `workdir`;
        # without STATE_DIR ours keeps a ban store in the host's /var/lib/portsentry, shared by
        # all runs.
        settings["HOSTS_DENY_FILE"] = str(workdir / "hosts.deny")
        settings["STATE_DIR"] = str(workdir / "state")
        # Its default is /run/portsentry/control.sock on the host; bench/perf.py also asks it for
        # status (probes seen) through this socket.
        settings["CONTROL_SOCKET"] = str(control_socket(workdir))
        # Log every hit from a blocked host as 1.2 does, so both daemons do the same logging work
        # (ours' default folds repeats into one summary line per window).
        settings["LOG_REPEAT_LIMIT"] = "0"
    if native:
        # The native block: an element in ours' own nftables set, added over netlink. Without
        # KILL_ROUTE nothing else runs, and CAPTURE=auto then reads probes through NFLOG rules
        # that sit after the drop of blocked hosts.
        del settings["KILL_ROUTE"]
        settings["BAN_BACKEND"] = "nftables"
    return "".join(f'{key}="{value}"\n' for key, value in settings.items())


@dataclass
class Running:
    """A started daemon: its pid (the process that does the work) and how to stop it."""

    pid: int
    proc: subprocess.Popen[bytes] | None
    stderr_path: Path


class Subject:
    """A PortSentry implementation the bench can start in a namespace."""

    name = "?"
    label = "?"

    def start(self, net: rig.Namespaces, workdir: Path, receiver: Receiver, ignore: Sequence[str],
              mode: str = "-atcp") -> Running:
        raise NotImplementedError

    def stop(self, running: Running) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        while Path(f"/proc/{running.pid}").exists() and time.monotonic() < deadline:
            if running.proc is not None and running.proc.poll() is not None:
                break
            time.sleep(0.02)
        if running.proc is not None:
            rig.stop_process(running.proc, timeout=2.0)

    def write_common(self, workdir: Path, ignore: Sequence[str]) -> str:
        (workdir / "portsentry.ignore").write_text("".join(f"{entry}\n" for entry in ignore))
        (workdir / "hosts.deny").touch()
        return config_text(workdir, ours=isinstance(self, Ours), native=isinstance(self, OursNative))

    def start_modes(self, net: rig.Namespaces, workdir: Path, receiver: Receiver,
                    ignore: Sequence[str], modes: Sequence[str]) -> list[Running]:
        """Start the daemon watching all of `modes` (flags like "-atcp"): one process here; a
        subclass that can run only one mode per process starts one each."""
        return [self.start(net, workdir, receiver, ignore, " ".join(modes))]


def _wait_ready(receiver: Receiver, since: int, alive: Callable[[], bool], report: Callable[[], str],
                timeout: float = 20.0) -> Entry:
    deadline = time.monotonic() + timeout
    while True:
        for entry in receiver.entries(since):
            if rig.READY_TEXT in entry.message:
                return entry
        if not alive():
            raise BenchError(f"daemon exited before it was ready\n{report()}")
        if time.monotonic() > deadline:
            raise BenchError(f"daemon not ready after {timeout}s\n{report()}")
        time.sleep(0.02)


class Ours(Subject):
    name = "ours"
    label = "this PortSentry"

    def __init__(self, profile_to: Path | None = None, log_stderr: bool = False,
                 source: Path | None = None) -> None:
        self.profile_to = profile_to
        self.log_stderr = log_stderr
        self.source = source or REPO_ROOT / "src"

    def env(self) -> dict[str, str]:
        env = rig.daemon_env()
        # Ahead of the editable install, so an exported revision really is what runs.
        env["PYTHONPATH"] = str(self.source)
        return env

    def argv(self, conf: Path, receiver: Receiver, mode: str) -> list[str]:
        python = [sys.executable]
        if self.profile_to is not None:
            python += ["-m", "cProfile", "-o", str(self.profile_to)]
        return [*python, "-m", "portsentry", "-c", str(conf), "--syslog-socket", str(receiver.path),
                *(["--log-stderr"] if self.log_stderr else []), *mode.split()]

    def start(self, net: rig.Namespaces, workdir: Path, receiver: Receiver, ignore: Sequence[str],
              mode: str = "-atcp") -> Running:
        conf = workdir / "portsentry.conf"
        conf.write_text(self.write_common(workdir, ignore))
        stderr_path = workdir / "ours.stderr"
        since = receiver.count()
        with stderr_path.open("wb") as err:
            proc = rig.popen_in(net.target, self.argv(conf, receiver, mode), stdout=err, stderr=err,
                                env=self.env())
        _wait_ready(receiver, since, lambda: proc.poll() is None,
                    lambda: f"exit {proc.returncode}; stderr:\n{tail(stderr_path)}")
        return Running(proc.pid, proc, stderr_path)


class OursNative(Ours):
    """Ours with BAN_BACKEND="nftables" instead of 1.2's KILL_ROUTE (and so NFLOG capture), and
    KERNEL_BAN at its default, auto: the kernel path, where the first probe bans its source."""

    name = "ours-nft"
    label = "this PortSentry, BAN_BACKEND=nftables (KERNEL_BAN=auto)"


class Debian12(Subject):
    name = "1.2"
    label = "Debian PortSentry 1.2"

    def start(self, net: rig.Namespaces, workdir: Path, receiver: Receiver, ignore: Sequence[str],
              mode: str = "-atcp") -> Running:
        if not DEBIAN_BINARY.is_file():
            raise BenchError(f"{DEBIAN_BINARY} missing: run scripts/fetch-debian-portsentry")
        # One set of layers per mode: overlayfs refuses a work directory that is in use, and
        # 1.2 runs one process per mode.
        layers = workdir / f"debian{mode.replace(' ', '')}"
        for sub in ("etc-upper/portsentry", "etc-work", "dev-upper", "dev-work"):
            (layers / sub).mkdir(parents=True, exist_ok=True)
        (layers / "etc-upper" / "portsentry" / "portsentry.conf").write_text(
            self.write_common(workdir, ignore))
        # 1.2 has its config path and /dev/log compiled in. In a private mount namespace both /etc
        # and /dev become overlays whose upper layers are in `layers`, then the receiver's socket
        # is bind-mounted on the (overlay-only) /dev/log. The host has no /dev/log to bind onto,
        # and creating one, or /etc/portsentry, would change the host.
        script = (
            "set -e; "
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={layers}/etc-upper,"
            f"workdir={layers}/etc-work /etc; "
            f"mount -t overlay overlay -o lowerdir=/dev,upperdir={layers}/dev-upper,"
            f"workdir={layers}/dev-work /dev; "
            f"touch /dev/log; mount --bind {receiver.path} /dev/log; "
            f"exec {DEBIAN_BINARY} {mode}"
        )
        stderr_path = workdir / f"debian{mode.replace(' ', '')}.stderr"
        since = receiver.count()
        with stderr_path.open("wb") as err:
            launcher = subprocess.run(
                rig.ns_argv(net.target, ["unshare", "-m", "--propagation", "private", "sh", "-c", script]),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, timeout=30, check=False)
        if launcher.returncode != 0:
            raise BenchError(f"1.2 did not start (exit {launcher.returncode}):\n{tail(stderr_path)}")
        # It forks into the background; the readiness line comes from the daemon itself.
        ready = _wait_ready(receiver, since, lambda: True, lambda: tail(stderr_path))
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", net.target], capture_output=True,
                                                text=True, check=True, timeout=10).stdout.split()]
        daemons = [p for p in pids if _comm(p) == "portsentry"]
        if ready.pid not in daemons:
            raise BenchError(f"1.2's readiness line came from pid {ready.pid}, namespace has {daemons}")
        return Running(ready.pid, None, stderr_path)

    def start_modes(self, net: rig.Namespaces, workdir: Path, receiver: Receiver,
                    ignore: Sequence[str], modes: Sequence[str]) -> list[Running]:
        return [self.start(net, workdir, receiver, ignore, mode) for mode in modes]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def tail(path: Path, size: int = 3000) -> str:
    """The end of a log file, for error reports."""
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


def export_revision(rev: str, into: Path) -> Path:
    """`src/` of git revision `rev`, unpacked under `into` (read-only use of the repository), with
    its compiled fast lane built as an install builds it (revisions that have one)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", rev, "src"],
                             capture_output=True, timeout=60, check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=60)
    if (into / "src" / "portsentry" / "sensors" / "lane.c").exists():
        build = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", rev, "setup.py",
                                "pyproject.toml"], capture_output=True, timeout=60, check=True)
        subprocess.run(["tar", "-x", "-C", str(into)], input=build.stdout, check=True, timeout=60)
        built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into,
                               capture_output=True, text=True, timeout=300, check=False)
        if built.returncode != 0:
            raise BenchError(f"building the fast lane of {rev}: {built.stderr.strip()[-2000:]}")
    return into / "src"


def resolve_revision(rev: str) -> str:
    """The short commit hash `rev` names now (BenchError if it names none)."""
    argv = ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "--verify", f"{rev}^{{commit}}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise BenchError(f"--ours-rev {rev}: {out.stderr.strip() or 'not a commit'}")
    return out.stdout.strip()


def describe_source(rev: str | None) -> str:
    """Which code 'ours' is: a commit, or the working tree (flagged when src/ has changes)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                             timeout=30, check=False)
        return out.stdout.strip()

    if rev is not None:
        return f"git {git('rev-parse', '--short', rev)} ({rev}), src/ exported with git archive"
    dirty = git("status", "--porcelain", "--", "src")
    state = "with uncommitted changes in src/" if dirty else "clean"
    return f"working tree at git {git('rev-parse', '--short', 'HEAD')}, {state}"


# ---------------------------------------------------------------------------------------------
# Scanners


@dataclass(frozen=True, slots=True)
class ScanRun:
    started: float
    finished: float
    sent: int
    output: str


def nmap_scan(ns: str, target: str, min_rate: int, timeout: float = 180.0) -> ScanRun:
    """One full SYN scan of every port, no retries; `sent` is nmap's own count of raw packets."""
    argv = ["nmap", "-sS", "-p-", "--min-rate", str(min_rate), "-n", "-Pn", "--max-retries", "0",
            "--host-timeout", "120s", "-v", target]
    started = time.time()
    proc = rig.run_in(ns, argv, timeout=timeout, check=True)
    finished = time.time()
    match = re.search(r"Raw packets sent: (\d+)", proc.stdout)
    if match is None:
        raise BenchError(f"nmap printed no packet count:\n{proc.stdout[-2000:]}")
    return ScanRun(started, finished, int(match[1]), proc.stdout)


def hping_flood(ns: str, target: str, source: str, port: int, count: int, interval_us: int,
                timeout: float = 60.0) -> ScanRun:
    """`count` SYNs from `source` to one port, `interval_us` apart (hping3 -i uN), killed after
    `timeout` at the latest."""
    argv = ["hping3", "-q", "-S", "-p", str(port), "-a", source, "-i", f"u{interval_us}",
            "-c", str(count), target]
    started = time.time()
    proc = rig.run_in(ns, argv, timeout=timeout)
    finished = time.time()
    text = proc.stdout + proc.stderr
    match = re.search(r"(\d+) packets transmitted", text)
    if match is None:
        raise BenchError(f"hping3 printed no statistics (exit {proc.returncode}):\n{text[-2000:]}")
    return ScanRun(started, finished, int(match[1]), text)


class SynSender:
    """bench/synsend.py running in the scanner namespace: one SYN per call, with its send time."""

    def __init__(self, ns: str) -> None:
        script = Path(__file__).with_name("synsend.py")
        self._proc = subprocess.Popen(
            rig.ns_argv(ns, [sys.executable, str(script)]), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, source: str, destination: str, port: int, flags: int = 0x02) -> float:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{source} {destination} {port} {flags:02x}\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise BenchError(f"synsend exited ({self._proc.poll()})")
        return float(line)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def write_section(doc: Path, title: str, begin: str, end: str, block: str) -> None:
    """Put `block` between the markers `begin` and `end` of `doc`, replacing what a previous run
    wrote; the first time, a section `title` with the markers is added at the end."""
    text = doc.read_text()
    if begin not in text:
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{block}{end}{tail}")
