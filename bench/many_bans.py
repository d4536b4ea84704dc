"""Issue 10 ("A daemon that never stalls and idles with 100k bans"): what the daemon costs at rest
with many bans, how long it takes to start with them, and whether hanging commands or slow
control clients hold anything up. Three parts of bench/run:

- `idle`: the ban store is filled directly (N active bans with a 30-day expiry, one transaction),
  the daemon starts in a fresh target namespace with BAN_BACKEND="nftables" (BAN_SET_SIZE above
  N) or "none" (store and tick only, no kernel set), and once READY plus a settling pause its
  utime+stime and VmRSS are read from /proc every second over a window. Start-up times of these
  runs are reported too.
- `startup`: the same start, 1M bans, READY only (no idle window).
- `stalls`: KILL_ROUTE="sleep 30; true $TARGET$" (COMMAND_TIMEOUT 60) with four scanners whose
  blocks hang; meanwhile bans expire (put in the store by the bench), `list` is asked over the
  control socket and by the CLI, and new scanners probe. Then, in a fresh daemon with a quick
  KILL_ROUTE, a control client sends one byte a second while scanners probe, and a request of
  60,000 `[` is sent.

Everything runs in namespaces from tests/system/rig.py (198.18.0.0/15, fd00::/8), every file in a
temporary directory; bounded waits everywhere: a figure that cannot be had within its bound is
reported as "not within N s".
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from tests.system import rig
from tests.system.teardown import run_tempdir

from bench import harness
from bench.harness import BenchError, Receiver
from portsentry.service import control

PARTS = ("idle", "startup", "stalls")
# One block per --issue10-label (before the redesign, after it, an older revision...).
BEGIN = "<!-- bench:issue10:{slug}:begin (written by bench/run --only idle/startup/stalls) -->"
END = "<!-- bench:issue10:{slug}:end -->"
TITLE = "Idle with many bans, stalls and start-up (issue 10)"

SIZES = (1_000, 10_000, 100_000, 1_000_000)
BACKENDS = ("nftables", "none")
WATCHED_PORT = 79
EXPIRY = 30 * 86400.0
SETTLE = 5.0  # seconds between READY and the start of the idle window
# Pre-populated bans: IPv4 from 198.18.2.0 up (clear of the rig's hosts; 100k end at
# 198.19.136.161), then IPv6 from fd00:10:: up.
V4_BASE = int(IPv4Address("198.18.2.0"))
V4_MAX = 100_000
V6_BASE = int(IPv6Address("fd00:10::"))
STATE_FILE = "bans.sqlite3"
_TICK = os.sysconf("SC_CLK_TCK")
# The src/ the daemon and the CLI run from (bench/run --ours-rev exports one); None: the work tree.
SOURCE: Path | None = None
# --py-spy-dir: start-ups and idle windows are recorded with py-spy into it (not for the figures).
SPY_DIR: Path | None = None


def daemon_env() -> dict[str, str]:
    env = rig.daemon_env()
    if SOURCE is not None:
        env["PYTHONPATH"] = str(SOURCE)
    return env


def ban_address(i: int) -> str:
    return str(IPv4Address(V4_BASE + i)) if i < V4_MAX else str(IPv6Address(V6_BASE + i))


def populate(path: Path, count: int, expires: float) -> float:
    """A ban store at `path` with `count` active bans (schema made by BanStore itself); returns
    the seconds it took. One transaction, executemany."""
    started = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The schema as the code under test makes it (an older revision has an older schema).
    # portsentry.store before the layered package (issue 10.7), portsentry.bans.store since.
    make = ("import sys\ntry:\n    from portsentry.bans.store import BanStore\nexcept ImportError:\n"
            "    from portsentry.store import BanStore\nBanStore(sys.argv[1]).close()\n")
    subprocess.run([sys.executable, "-c", make, str(path)], env=daemon_env(), check=True, timeout=60)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        now = time.time()
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO bans (address, reason, mode, port, first_seen, last_seen, count, expires, "
            "offences, hosts_deny_line, backends) "
            "VALUES (?, 'bench: pre-populated', 'tcp', ?, ?, ?, 1, ?, 1, NULL, '[]')",
            ((ban_address(i), WATCHED_PORT, now, now, expires) for i in range(count)))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return time.monotonic() - started


def store_bans(path: Path, bans: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Ban each (address, seconds) through the BanStore of the code under test; their expiries."""
    script = (
        "import json, sys, time\n"
        "try:\n    from portsentry.bans.store import BanStore\n"
        "except ImportError:\n    from portsentry.store import BanStore\n"
        "from ipaddress import ip_address\n"
        "store = BanStore(sys.argv[1])\nout = {}\n"
        "for address, seconds in json.loads(sys.argv[2]):\n"
        "    ban = store.ban(ip_address(address), reason='bench: expires during the hang', mode='tcp',\n"
        f"                    port={WATCHED_PORT}, now=time.time(), duration=seconds)\n"
        "    out[address] = ban.expires\n"
        "store.close()\nprint(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(list(bans))], env=daemon_env(),
                          check=True, timeout=60, capture_output=True, text=True)
    return {address: float(expires) for address, expires in json.loads(done.stdout).items()}


# ---------------------------------------------------------------------------------------------
# Starting the daemon


def config_text(workdir: Path, overrides: dict[str, str | None]) -> str:
    """harness.config_text for ours, with keys replaced (None: key removed)."""
    settings: dict[str, str] = {}
    for line in harness.config_text(workdir, ours=True).splitlines():
        key, value = line.split("=", 1)
        settings[key] = value.strip('"')
    for key, new in overrides.items():
        if new is None:
            settings.pop(key, None)
        else:
            settings[key] = new
    return "".join(f'{key}="{value}"\n' for key, value in settings.items())


class NotifyListener:
    """A $NOTIFY_SOCKET for the daemon: keeps when READY=1 arrived (time.time())."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ready_at: float | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(os.fspath(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-notify", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.ready_at is None and b"READY=1" in data.split(b"\n"):
                self.ready_at = time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Daemon:
    net: rig.Namespaces
    workdir: Path
    receiver: Receiver
    proc: subprocess.Popen[bytes] | None = None
    spawned: float = 0.0
    ready_at: float | None = None  # the readiness syslog line's kernel stamp
    notify_at: float | None = None
    stderr_path: Path = Path("/dev/null")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def conf(self) -> Path:
        return self.workdir / "portsentry.conf"

    @property
    def control(self) -> Path:
        return harness.control_socket(self.workdir)

    @property
    def store(self) -> Path:
        return self.workdir / "state" / STATE_FILE

    def ready_s(self) -> float | None:
        return None if self.ready_at is None else self.ready_at - self.spawned


@contextlib.contextmanager
def namespace_and_dir(
        scanner_addresses: Sequence[str] = ()) -> Iterator[tuple[rig.Namespaces, Path, Receiver]]:
    """Fresh namespaces, a private directory and the syslog receiver; all removed afterwards."""
    workdir = run_tempdir("bench-i10")
    net = rig.create_namespaces(rig.new_prefix())
    receiver: Receiver | None = None
    try:
        harness.add_addresses(net.scanner, "eth0", scanner_addresses, 24)
        receiver = Receiver(workdir / "log", net.target)
        yield net, workdir, receiver
    finally:
        harness.remove_rig(net, receiver, workdir)


def start(daemon: Daemon, conf: str, mode: str, ready_bound: float, spy_name: str = "") -> None:
    """Start ours in the target namespace with a $NOTIFY_SOCKET; wait for READY at most
    `ready_bound` seconds (ready_at stays None when it did not come)."""
    daemon.conf.write_text(conf)
    (daemon.workdir / "portsentry.ignore").write_text("127.0.0.1/32\n")
    (daemon.workdir / "hosts.deny").touch()
    notify = NotifyListener(daemon.workdir / "notify.sock")
    env = daemon_env()
    env["NOTIFY_SOCKET"] = str(notify.path)
    daemon.stderr_path = daemon.workdir / "ours.stderr"
    argv = [sys.executable, "-m", "portsentry", "-c", str(daemon.conf), "--syslog-socket",
            str(daemon.receiver.path), *mode.split()]
    since = daemon.receiver.count()
    try:
        with daemon.stderr_path.open("wb") as err:
            daemon.spawned = time.time()
            daemon.proc = rig.popen_in(daemon.net.target, argv, stdout=err, stderr=err, env=env)
        spy = SpyRecord(daemon.pid, SPY_DIR / f"{spy_name}-startup.txt") if SPY_DIR and spy_name else None
        deadline = time.monotonic() + ready_bound
        while time.monotonic() < deadline:
            ready = [e for e in daemon.receiver.entries(since) if rig.READY_TEXT in e.message]
            if ready:
                daemon.ready_at = ready[0].at
                break
            if daemon.proc.poll() is not None:
                raise BenchError(f"daemon exited {daemon.proc.returncode} before READY:\n"
                                 f"{harness.tail(daemon.stderr_path)}")
            time.sleep(0.01)
        # READY=1 is sent just after the line; give it a moment.
        wait_until = time.monotonic() + (1.0 if daemon.ready_at is not None else 0.0)
        while notify.ready_at is None and time.monotonic() < wait_until:
            time.sleep(0.01)
        daemon.notify_at = notify.ready_at
        if spy is not None and SPY_DIR is not None:
            (SPY_DIR / f"{spy_name}-startup-summary.txt").write_text(spy.stop())
    finally:
        notify.close()


def stop(daemon: Daemon) -> None:
    if daemon.proc is not None:
        rig.stop_process(daemon.proc, timeout=10.0)


# ---------------------------------------------------------------------------------------------
# /proc


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), without its children."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class SpyRecord:
    """`py-spy record --nonblocking` of `pid` into `out` (collapsed stacks) until stop(); does
    nothing without py-spy. Not used for the figures: sampling costs the daemon a little."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        tool = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if not tool:
            return
        # `ip netns exec` execs Python in place: wait until the pid is Python.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if "python" in os.readlink(f"/proc/{pid}/exe"):
                    break
            time.sleep(0.01)
        self.proc = subprocess.Popen(
            [tool, "record", "--pid", str(pid), "--nonblocking", "--threads", "--rate", "100",
             "--format", "raw", "--duration", "600", "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> str:
        """Stop, and the top frames by own and by total samples ('' if nothing recorded)."""
        if self.proc is None:
            return ""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return summarise_stacks(self.out)


def summarise_stacks(path: Path, top: int = 15) -> str:
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            samples += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames[1:]):  # the first frame is the thread
                total[frame] = total.get(frame, 0) + count
    if not samples:
        return ""
    out = [f"{samples} samples; by own samples:"]
    out += [f"  {n:6d} {100 * n / samples:5.1f}%  {f}"
            for f, n in sorted(own.items(), key=lambda i: -i[1])[:top]]
    out.append("by total samples (frame anywhere on the stack):")
    out += [f"  {n:6d} {100 * n / samples:5.1f}%  {f}"
            for f, n in sorted(total.items(), key=lambda i: -i[1])[:top]]
    return "\n".join(out) + "\n"


def py_spy_dump(pid: int) -> str:
    """Where every thread is, if py-spy is installed (PY_SPY or PATH); '' otherwise."""
    tool = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if not tool:
        return ""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run([tool, "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=20, check=False)
        return out.stdout
    return ""


# ---------------------------------------------------------------------------------------------
# idle / startup


@dataclass
class IdleResult:
    bans: int
    backend: str
    window: float
    ready_s: float | None
    notify_s: float | None
    ready_bound: float
    cpu_percent: float | None = None
    busiest_second_percent: float | None = None
    rss_mib: float | None = None
    rss_max_mib: float | None = None
    threads: int | None = None
    status_bans: int | None = None  # active bans per the daemon's `status`, after the window
    note: str = ""


def idle_conf(workdir: Path, backend: str, bans: int) -> str:
    overrides: dict[str, str | None] = {"KILL_ROUTE": None, "BAN_BACKEND": backend}
    if backend == "nftables":
        overrides["BAN_SET_SIZE"] = str(max(65_536, 2 * bans))
    return config_text(workdir, overrides)


def measure_idle(template: Path, bans: int, backend: str, window: float, ready_bound: float,
                 spy_dir: Path | None) -> IdleResult:
    with namespace_and_dir() as (net, workdir, receiver):
        daemon = Daemon(net, workdir, receiver)
        daemon.store.parent.mkdir(mode=0o700)
        shutil.copyfile(template, daemon.store)
        try:
            name = f"{bans}-{backend}-{time.strftime('%H%M%S')}"
            start(daemon, idle_conf(workdir, backend, bans), "-stcp", ready_bound, name)
            result = IdleResult(bans, backend, window, daemon.ready_s(),
                                None if daemon.notify_at is None else daemon.notify_at - daemon.spawned,
                                ready_bound)
            if daemon.ready_at is None:
                result.note = f"not READY within {ready_bound:.0f} s"
                if spy_dir is not None:
                    (spy_dir / f"not-ready-{bans}-{backend}.txt").write_text(py_spy_dump(daemon.pid))
                return result
            if window <= 0:
                return result
            time.sleep(SETTLE)
            pid = daemon.pid
            cpu = [own_cpu_seconds(pid)]
            rss = [harness.rss_kib(pid)]
            spy = SpyRecord(pid, spy_dir / f"{name}-idle.txt") if spy_dir is not None else None
            began = time.monotonic()
            for second in range(1, int(window) + 1):
                time.sleep(max(0.0, began + second - time.monotonic()))
                cpu.append(own_cpu_seconds(pid))
                rss.append(harness.rss_kib(pid))
            elapsed = time.monotonic() - began
            result.cpu_percent = (cpu[-1] - cpu[0]) / elapsed * 100
            result.busiest_second_percent = max(b - a for a, b in itertools.pairwise(cpu)) * 100
            result.rss_mib = rss[-1] / 1024
            result.rss_max_mib = max(rss) / 1024
            result.threads = threads(pid)
            with contextlib.suppress(BenchError):
                active = harness.daemon_status(daemon.control, timeout=10.0).get("active_bans")
                result.status_bans = active if isinstance(active, int) else None
            if spy is not None and spy_dir is not None:
                (spy_dir / f"{name}-idle-summary.txt").write_text(spy.stop())
            if daemon.proc is not None and daemon.proc.poll() is not None:
                result.note = f"daemon exited {daemon.proc.returncode} during the window"
            return result
        finally:
            stop(daemon)


def run_idle(sizes: Sequence[int], repeat: int, windows: dict[int, float], ready_bound: float,
             spy_dir: Path | None, startup_only: bool = False) -> list[IdleResult]:
    results: list[IdleResult] = []
    cache = run_tempdir("bench-i10-stores")
    try:
        for bans in sizes:
            template = cache / f"{bans}.sqlite3"
            took = populate(template, bans, time.time() + EXPIRY)
            print(f"  store with {bans} bans filled in {took:.1f} s", file=sys.stderr, flush=True)
            for run in range(repeat):
                order = BACKENDS if run % 2 == 0 else BACKENDS[::-1]
                for backend in order:
                    window = 0.0 if startup_only else windows[bans]
                    print(f"{'startup' if startup_only else 'idle'}: {bans} bans, BAN_BACKEND={backend}, "
                          f"run {run + 1}, window {window:.0f} s ...", file=sys.stderr, flush=True)
                    try:
                        result = measure_idle(template, bans, backend, window, ready_bound, spy_dir)
                    except BenchError as error:
                        result = IdleResult(bans, backend, window, None, None, ready_bound,
                                            note=str(error).splitlines()[0][:200])
                    print(f"    {result}", file=sys.stderr, flush=True)
                    results.append(result)
            template.unlink()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------
# stalls


DETECTION_OF = "host: \\S+/{ip} to TCP port"


@dataclass
class StallResult:
    hanging: int = 0  # KILL_ROUTE shells seen running
    detect_before_ms: list[float] = field(default_factory=list)
    detect_during_ms: list[float] = field(default_factory=list)
    expiry_late_s: list[float] = field(default_factory=list)  # line time - expiry (None: never)
    expiry_missing: int = 0
    list_socket_before_ms: list[float] = field(default_factory=list)
    list_socket_during_ms: list[float] = field(default_factory=list)
    list_cli_before_ms: list[float] = field(default_factory=list)
    list_cli_during_ms: list[float] = field(default_factory=list)
    missed: int = 0
    list_failures: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class SlowClientResult:
    detect_before_ms: list[float] = field(default_factory=list)
    detect_during_ms: list[float] = field(default_factory=list)
    slow_client_outcome: str = ""
    bracket_reply: str = ""
    bracket_reply_ms: float | None = None
    alive_after: bool = False
    missed: int = 0
    note: str = ""


def control_request(path: Path, payload: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send `payload` and read one reply line; (reply, ms). The client is the work tree's, the
    daemon may be an older revision's: the wire format has not changed."""
    started = time.perf_counter()
    data = control.exchange(os.fspath(path), payload, timeout)
    return data, (time.perf_counter() - started) * 1000


LIST_BOUND = 10.0  # seconds; a `list` with no answer by then is counted as failed


def list_via_socket(daemon: Daemon, failures: list[str]) -> float | None:
    """ms for a `list` over the control socket; None (and the reason in `failures`) if it
    failed or took over LIST_BOUND."""
    try:
        reply, ms = control_request(daemon.control, b'{"command": "list"}\n', LIST_BOUND)
    except OSError as error:
        failures.append(f"socket: {error or type(error).__name__}")
        return None
    if b'"bans"' not in reply:
        failures.append(f"socket: reply {reply[:100]!r}")
        return None
    return ms


def list_via_cli(daemon: Daemon, failures: list[str]) -> float | None:
    """`portsentry -c CONF list` as an admin runs it: a new Python process, wall time."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "portsentry", "list", "-c", str(daemon.conf)],
                              capture_output=True, text=True, timeout=LIST_BOUND + 5, env=daemon_env(),
                              check=False)
    except subprocess.TimeoutExpired:
        failures.append(f"cli: no answer within {LIST_BOUND + 5:.0f} s")
        return None
    ms = (time.perf_counter() - started) * 1000
    if proc.returncode != 0:
        failures.append(f"cli: exit {proc.returncode}")
        return None
    return ms


def keep(values: list[float], value: float | None) -> None:
    if value is not None:
        values.append(value)


def probe(sender: harness.SynSender, daemon: Daemon, source: str, bound: float = 5.0) -> float | None:
    """One SYN from `source` to the watched port; ms from its send to the detection line."""
    mark = daemon.receiver.count()
    sent = sender.send(source, daemon.net.target_ip4, WATCHED_PORT)
    try:
        seen = daemon.receiver.wait_for(re.compile(DETECTION_OF.format(ip=re.escape(source))), bound, mark)
    except BenchError:
        return None
    return (seen.at - sent) * 1000


def hanging_shells(ns: str) -> int:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10, check=False)
    count = 0
    for pid in out.stdout.split():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                count += 1
    return count


def measure_stall(hang: float) -> StallResult:
    scanners = [f"198.18.0.{20 + i}" for i in range(4)]
    during = [f"198.18.0.{40 + i}" for i in range(5)]
    expiring = [f"198.18.1.{200 + i}" for i in range(3)]
    result = StallResult()
    with namespace_and_dir([*scanners, *during]) as (net, workdir, receiver):
        daemon = Daemon(net, workdir, receiver)
        conf = config_text(workdir, {"KILL_ROUTE": f"sleep {hang:.0f}; true $TARGET$",
                                     "COMMAND_TIMEOUT": f"{2 * hang:.0f}"})
        try:
            start(daemon, conf, "-atcp", 30.0)
            if daemon.ready_at is None:
                result.note = "not READY within 30 s"
                return result
            rig.run_in(net.scanner, ["ping", "-c", "1", "-W", "2", net.target_ip4])
            sender = harness.SynSender(net.scanner)
            try:
                time.sleep(1.0)
                # Baseline, no command hanging yet: list, then one probe from each of the four
                # scanners, whose blocks then hang.
                for _ in range(3):
                    keep(result.list_socket_before_ms, list_via_socket(daemon, result.list_failures))
                    keep(result.list_cli_before_ms, list_via_cli(daemon, result.list_failures))
                for source in scanners:
                    got = probe(sender, daemon, source)
                    if got is None:
                        result.missed += 1
                    else:
                        result.detect_before_ms.append(got)
                hang_started = time.time()
                time.sleep(1.0)
                result.hanging = hanging_shells(net.target)
                # Bans that must expire while the commands hang, put in the store as the CLI does,
                # by the revision under test (a newer BanStore would migrate an older store).
                expiries = store_bans(daemon.store,
                                      [(address, 4.0 + 3 * n) for n, address in enumerate(expiring)])
                # While they hang: list every ~2 s, a new scanner every ~3 s.
                next_probe = 0
                while time.time() < hang_started + hang - 6.0:
                    keep(result.list_socket_during_ms, list_via_socket(daemon, result.list_failures))
                    keep(result.list_cli_during_ms, list_via_cli(daemon, result.list_failures))
                    if next_probe < len(during):
                        got = probe(sender, daemon, during[next_probe])
                        next_probe += 1
                        if got is None:
                            result.missed += 1
                        else:
                            result.detect_during_ms.append(got)
                    time.sleep(1.5)
                # The last expiry plus 3 s at most, then the lines are looked up.
                time.sleep(max(0.0, min(30.0, max(expiries.values()) + 3.0 - time.time())))
                for address, expires in expiries.items():
                    pattern = re.compile(rf"Host {re.escape(address)} has been unblocked: ban expired")
                    found = [e for e in receiver.entries() if pattern.search(e.message)]
                    if found:
                        result.expiry_late_s.append(found[0].at - expires)
                    else:
                        result.expiry_missing += 1
            finally:
                sender.close()
            return result
        finally:
            stop(daemon)


def measure_slow_client(seconds: float = 8.0) -> SlowClientResult:
    before = [f"198.18.0.{50 + i}" for i in range(3)]
    during = [f"198.18.0.{60 + i}" for i in range(5)]
    result = SlowClientResult()
    with namespace_and_dir([*before, *during]) as (net, workdir, receiver):
        daemon = Daemon(net, workdir, receiver)
        conf = config_text(workdir, {"KILL_ROUTE": "true $TARGET$"})
        try:
            start(daemon, conf, "-atcp", 30.0)
            if daemon.ready_at is None:
                result.note = "not READY within 30 s"
                return result
            rig.run_in(net.scanner, ["ping", "-c", "1", "-W", "2", net.target_ip4])
            sender = harness.SynSender(net.scanner)
            outcome: list[str] = []

            def slow() -> None:
                message = b'{"command": "status"}\n'
                started = time.monotonic()
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        sock.settimeout(1.0)
                        sock.connect(os.fspath(daemon.control))
                        for byte in message:
                            if time.monotonic() - started > seconds:
                                outcome.append(f"still connected after {seconds:.0f} s")
                                return
                            try:
                                sock.sendall(bytes([byte]))
                                reply = sock.recv(65536)
                                outcome.append(f"reply after {time.monotonic() - started:.1f} s: "
                                               f"{reply.decode(errors='replace').strip()[:120]}")
                                return
                            except TimeoutError:
                                continue
                        outcome.append("whole request sent")
                except OSError as error:
                    outcome.append(f"{error} after {time.monotonic() - started:.1f} s")

            try:
                time.sleep(1.0)
                for source in before:
                    got = probe(sender, daemon, source)
                    (result.detect_before_ms.append(got) if got is not None else None)
                    result.missed += got is None
                    time.sleep(0.5)
                client = threading.Thread(target=slow, name="bench-slow-client", daemon=True)
                client.start()
                time.sleep(0.5)
                for source in during:
                    got = probe(sender, daemon, source)
                    (result.detect_during_ms.append(got) if got is not None else None)
                    result.missed += got is None
                    time.sleep(0.8)
                client.join(seconds + 3.0)
                result.slow_client_outcome = outcome[0] if outcome else "no outcome"
                try:
                    reply, ms = control_request(daemon.control, b"[" * 60_000 + b"\n")
                    result.bracket_reply = reply.decode(errors="replace").strip()[:200]
                    result.bracket_reply_ms = ms
                except OSError as error:
                    result.bracket_reply = f"no reply: {error}"
                time.sleep(0.5)
                alive = daemon.proc is not None and daemon.proc.poll() is None
                with contextlib.suppress(BenchError):
                    harness.daemon_status(daemon.control, timeout=5.0)
                    result.alive_after = alive
            finally:
                sender.close()
            return result
        finally:
            stop(daemon)


# ---------------------------------------------------------------------------------------------
# Report


def fmt(value: float | None, decimals: int = 1) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def runs(values: Sequence[str]) -> str:
    return " / ".join(values)


def ms_summary(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values):.1f}, max {max(values):.1f} (n={len(values)})"


def idle_markdown(results: Sequence[IdleResult]) -> list[str]:
    lines = ["| bans | BAN_BACKEND | window | start → READY line (s) | start → READY=1 (s) | CPU, % of "
             "one core | busiest second, % | VmRSS end (MiB) | VmRSS max (MiB) | threads | bans per "
             "`status` | note |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    keys: list[tuple[int, str]] = []
    for r in results:
        if (r.bans, r.backend) not in keys:
            keys.append((r.bans, r.backend))
    for bans, backend in keys:
        group = [r for r in results if (r.bans, r.backend) == (bans, backend)]

        def ready(r: IdleResult) -> str:
            return fmt(r.ready_s, 2) if r.ready_s is not None else f"> {r.ready_bound:.0f}"

        lines.append(
            f"| {bans:,} | {backend} | {group[0].window:.0f} s "
            f"| {runs([ready(r) for r in group])} "
            f"| {runs([fmt(r.notify_s, 2) for r in group])} "
            f"| {runs([fmt(r.cpu_percent, 2) for r in group])} "
            f"| {runs([fmt(r.busiest_second_percent, 0) for r in group])} "
            f"| {runs([fmt(r.rss_mib, 0) for r in group])} "
            f"| {runs([fmt(r.rss_max_mib, 0) for r in group])} "
            f"| {runs([str(r.threads) if r.threads is not None else '-' for r in group])} "
            f"| {runs([str(r.status_bans) if r.status_bans is not None else '-' for r in group])} "
            f"| {'; '.join(sorted({r.note for r in group if r.note}))} |")
    return lines


def stall_markdown(results: Sequence[StallResult]) -> list[str]:
    rows: list[tuple[str, Callable[[StallResult], str]]] = [
        ("KILL_ROUTE shells seen hanging", lambda r: str(r.hanging)),
        ("detection line after probe, the four scanners before the hang (ms)",
         lambda r: ms_summary(r.detect_before_ms)),
        ("detection line after probe, new scanner during the hang (ms; goal < 10)",
         lambda r: ms_summary(r.detect_during_ms)),
        ("probes with no detection line within 5 s", lambda r: str(r.missed)),
        ("ban expiry line minus expiry time (s; goal ±1)",
         lambda r: ", ".join(f"{v:+.2f}" for v in r.expiry_late_s) + (
             f"; {r.expiry_missing} not expired" if r.expiry_missing else "")),
        ("`list` over the control socket, before the hang (ms)",
         lambda r: ms_summary(r.list_socket_before_ms)),
        ("`list` over the control socket, during the hang (ms; goal < 100)",
         lambda r: ms_summary(r.list_socket_during_ms)),
        ("`portsentry list` CLI wall time, before the hang (ms)", lambda r: ms_summary(r.list_cli_before_ms)),
        ("`portsentry list` CLI wall time, during the hang (ms; goal < 100)",
         lambda r: ms_summary(r.list_cli_during_ms)),
        ("`list` requests failed or over 10 s (socket) / 15 s (CLI)",
         lambda r: str(len(r.list_failures)) + (f" ({'; '.join(sorted(set(r.list_failures)))[:200]})"
                                                if r.list_failures else "")),
        ("note", lambda r: r.note or "-"),
    ]
    head = "| figure | " + " | ".join(f"run {i + 1}" for i in range(len(results))) + " |"
    lines = [head, "| --- | " + " | ".join("---" for _ in results) + " |"]
    lines += [f"| {label} | " + " | ".join(get(r) for r in results) + " |" for label, get in rows]
    return lines


def slow_markdown(results: Sequence[SlowClientResult]) -> list[str]:
    rows: list[tuple[str, Callable[[SlowClientResult], str]]] = [
        ("detection line after probe, no slow client (ms)", lambda r: ms_summary(r.detect_before_ms)),
        ("detection line after probe, one-byte-a-second client connected (ms)",
         lambda r: ms_summary(r.detect_during_ms)),
        ("probes with no detection line within 5 s", lambda r: str(r.missed)),
        ("what the slow client got", lambda r: r.slow_client_outcome.replace("|", "\\|")),
        ("reply to 60,000 `[`", lambda r: r.bracket_reply.replace("|", "\\|")),
        ("time to that reply (ms)", lambda r: fmt(r.bracket_reply_ms, 1)),
        ("daemon alive and answering `status` afterwards", lambda r: "yes" if r.alive_after else "NO"),
        ("note", lambda r: r.note or "-"),
    ]
    head = "| figure | " + " | ".join(f"run {i + 1}" for i in range(len(results))) + " |"
    lines = [head, "| --- | " + " | ".join("---" for _ in results) + " |"]
    lines += [f"| {label} | " + " | ".join(get(r) for r in results) + " |" for label, get in rows]
    return lines


def write_block(doc: Path, block: str, label: str) -> None:
    """Put `block` between the markers of `label`, replacing what a run with the same label
    wrote; a new label's block goes at the end of this section (made the first time)."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    begin, end = BEGIN.format(slug=slug), END.format(slug=slug)
    text = doc.read_text()
    heading = f"## {TITLE}"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n"
    if begin not in text or end not in text:
        start = text.index(heading)
        following = text.find("\n## ", start + len(heading))
        at = len(text) if following < 0 else following + 1
        text = text[:at].rstrip("\n") + f"\n\n{begin}\n{end}\n" + ("\n" + text[at:] if text[at:] else "")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{block}{end}{tail}")


def measure(only: set[str], *, repeat: int, sizes: Sequence[int], idle_seconds: float,
            scaling_seconds: float, ready_bound: float, hang: float, spy_dir: Path | None,
            label: str, command: str, load_at_start: Callable[[], str], source: Path | None = None,
            rev: str | None = None) -> str:
    """Run the selected parts (the daemon from `source`, exported git revision `rev`, or the
    work tree); returns the markdown block for docs/performance.md."""
    global SOURCE, SPY_DIR
    SOURCE, SPY_DIR = source, spy_dir
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    source_at_start = harness.describe_source(rev)  # before any commit made while it runs
    load0 = load_at_start()
    if spy_dir is not None:
        spy_dir.mkdir(parents=True, exist_ok=True)
    windows = {n: (idle_seconds if n == 100_000 else scaling_seconds) for n in sizes}
    idle: list[IdleResult] = []
    startup: list[IdleResult] = []
    stalls: list[StallResult] = []
    slow: list[SlowClientResult] = []
    if "idle" in only:
        idle = run_idle(sizes, repeat, windows, ready_bound, spy_dir)
    if "startup" in only:
        startup = run_idle([1_000_000], repeat, windows, ready_bound, spy_dir, startup_only=True)
    if "stalls" in only:
        for run in range(repeat):
            print(f"stalls: {hang:.0f} s hanging KILL_ROUTE, run {run + 1} ...", file=sys.stderr, flush=True)
            try:
                stalls.append(measure_stall(hang))
            except (BenchError, OSError, subprocess.SubprocessError) as error:
                stalls.append(StallResult(note=f"failed: {str(error).splitlines()[0][:200]}"))
            print(f"    {stalls[-1]}", file=sys.stderr, flush=True)
            print(f"stalls: slow control client and 60,000 '[', run {run + 1} ...", file=sys.stderr,
                  flush=True)
            try:
                slow.append(measure_slow_client())
            except (BenchError, OSError, subprocess.SubprocessError) as error:
                slow.append(SlowClientResult(note=f"failed: {str(error).splitlines()[0][:200]}"))
            print(f"    {slow[-1]}", file=sys.stderr, flush=True)

    lines = [
        f"**{label}.** Run on {started} by `{command}` (as root), against "
        f"{source_at_start}. The machine has "
        f"{os.cpu_count()} cores and other engineers ran tests on it at the same time (load average "
        f"at start / end: {load0} / {load_at_start()}), so every figure is given once per run "
        f"(\"run 1 / run 2\"), not averaged.",
        "",
    ]
    window_text = (f"Window: {idle_seconds:.0f} s at every size" if idle_seconds == scaling_seconds
                   else f"Windows: {idle_seconds:.0f} s at 100k, {scaling_seconds:.0f} s at the other sizes")
    if idle or startup:
        lines += [
            "#### Idle with N active bans, no traffic",
            "",
            "The ban store (SQLite, its schema made by BanStore) is filled directly with N active "
            "bans, 30-day expiry, in one transaction (IPv4 from 198.18.2.0 for the first 100k, "
            "IPv6 from fd00:10:: beyond). The daemon runs `-stcp` in a fresh target namespace, "
            "without KILL_ROUTE, with BAN_BACKEND=\"nftables\" (BAN_SET_SIZE = max(65536, 2N)) or "
            "\"none\" (store and tick only); every other key as in the set-up above. \"start → "
            "READY line\": from spawning `python -m portsentry` (via `ip netns exec`) to the kernel "
            "stamp of \"PortSentry is now active and listening.\" at the syslog receiver; \"start → "
            "READY=1\": to READY=1 arriving on a $NOTIFY_SOCKET the bench provides. "
            f"After READY the bench waits {SETTLE:.0f} s, then reads /proc/PID/stat utime+stime "
            "(all threads, not children) and VmRSS every second over the window: CPU is the "
            "window's total over its length, \"busiest second\" the largest one-second step, "
            "VmRSS at the end and the largest reading. Goals: CPU < 1% and VmRSS < 80 MB at "
            "100k; tick cost flat from 1k to 1M; READY < 5 s at 1M. "
            f"{window_text}; a window of 0 s is a start-up-only run (`--only startup`). READY is waited for "
            f"at most {ready_bound:.0f} s; \"bans per `status`\" is the daemon's own count after "
            "the window.",
            "",
            *idle_markdown(idle + startup),
            "",
        ]
    if stalls:
        lines += [
            "#### Four hanging KILL_ROUTE commands",
            "",
            f"`-atcp`, KILL_ROUTE=\"sleep {hang:.0f}; true $TARGET$\", COMMAND_TIMEOUT={2 * hang:.0f}, "
            "BAN_BACKEND none. Probes are single SYNs to port 79 from bench/synsend.py in the "
            "scanner namespace (send time) and the detection line's kernel stamp at the syslog "
            "receiver. Before the hang: three `list` requests (control socket, and the "
            "`portsentry -c CONF list` CLI as a new process, wall time including Python's start), "
            "then one probe from each of four scanners (fresh sources), whose blocks then hang "
            "in `sleep`. One second later the bench counts "
            "the `sleep` processes in the namespace and puts three bans in the store "
            "(BanStore.ban, as the CLI does) expiring 4, 7 and 10 s later; then, until 6 s "
            "before the commands end, it asks `list` both ways and sends one probe from a new "
            "source every ~2-3 s. Expiry lateness is the \"unblocked: ban expired\" line's stamp "
            "minus the ban's expiry.",
            "",
            *stall_markdown(stalls),
            "",
            "#### Slow control client and a request of 60,000 `[`",
            "",
            "A fresh daemon (`-atcp`, KILL_ROUTE=\"true $TARGET$\"). Three probes from fresh "
            "sources with no client connected, then a client connects and sends "
            "`{\"command\": \"status\"}` one byte a second (for at most 8 s) while five more "
            "probes come from fresh sources; then one request of 60,000 `[` and a newline, and a "
            "`status` request to see the daemon still answers.",
            "",
            *slow_markdown(slow),
            "",
        ]
    if spy_dir is not None:
        lines += [f"With py-spy recording the daemon (`--py-spy-dir {spy_dir}`): sampling costs it "
                  "CPU, so these figures are not comparable with runs without it.", ""]
    return "\n".join(lines)
