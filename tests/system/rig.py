"""Test rig for the system tests: throwaway network namespaces, a syslog receiver, the daemon under
test and scanner helpers, so each test drives a real PortSentry from a real scanner without root
side effects outside the namespaces it creates."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from portsentry.journal.receiver import DatagramReceiver
from tests.system.reaper import kill_inside
from tests.system.teardown import RUN_PREFIX, Shield, run_tempdir, start_reaper

REPO_ROOT = Path(__file__).resolve().parents[2]

READY_TEXT = "PortSentry is now active and listening."

# The longest path a Unix socket can bind on Linux (sun_path is 108 bytes including the NUL).
_MAX_UNIX_PATH = 107


class RigError(AssertionError):
    """A rig step failed; an AssertionError so pytest shows it as a test failure with details."""


# ---------------------------------------------------------------------------------------------
# Namespaces


@dataclass(frozen=True, slots=True)
class Namespaces:
    """Names and addresses of one test's namespaces.

    target  eth0 198.18.0.1/24 fd00:18::1/64   <-veth->  scanner   eth0 198.18.0.2 fd00:18::2
    target  eth1 198.18.1.1/24 fd00:18:1::1/64 <-veth->  scanner2  eth0 198.18.1.2 fd00:18:1::2
    Scanners route everything via the target, so they can also reach its other link's address.
    """

    prefix: str
    target: str
    scanner: str
    scanner2: str
    target_ip4: str = "198.18.0.1"
    scanner_ip4: str = "198.18.0.2"
    target2_ip4: str = "198.18.1.1"
    scanner2_ip4: str = "198.18.1.2"
    target_ip6: str = "fd00:18::1"
    scanner_ip6: str = "fd00:18::2"
    target2_ip6: str = "fd00:18:1::1"
    scanner2_ip6: str = "fd00:18:1::2"

    @property
    def names(self) -> tuple[str, str, str]:
        return (self.target, self.scanner, self.scanner2)


def new_prefix() -> str:
    """A prefix unique to one fixture use within this run."""
    return f"{RUN_PREFIX}{secrets.token_hex(3)}"


def _ip(*args: str, timeout: float = 10.0) -> str:
    # A process group of its own: a second Ctrl-C at the terminal, which reaches the whole
    # foreground group, must not kill the `ip netns del` of the teardown it interrupted.
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False,
        process_group=0,
    )
    if proc.returncode != 0:
        raise RigError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def list_namespaces(prefix: str) -> list[str]:
    """Named network namespaces whose name starts with `prefix`."""
    out = _ip("netns", "list")
    # Lines look like "ps-1-abc-tgt (id: 3)" or just "ps-1-abc-tgt".
    names = (line.split()[0] for line in out.splitlines() if line.strip())
    return sorted(name for name in names if name.startswith(prefix))


def _kill_namespace_processes(name: str) -> None:
    """SIGKILL every process still inside namespace `name` (they were all started by this rig)."""
    _killed, survivors = kill_inside(name)
    if survivors:
        raise RigError(f"processes {survivors} in namespace {name} survived SIGKILL")


def destroy_namespaces(names: Sequence[str]) -> None:
    """Remove the namespaces (killing what runs in them); raise if any is still there afterwards.
    A signal meanwhile waits until they are gone."""
    with Shield():
        _destroy_namespaces(names)


def _destroy_namespaces(names: Sequence[str]) -> None:
    errors: list[str] = []
    present = set(list_namespaces(""))
    for name in names:
        if name not in present:
            continue
        try:
            _kill_namespace_processes(name)
            _ip("netns", "del", name)
        except RigError as exc:
            errors.append(str(exc))
    left = [name for name in list_namespaces("") if name in set(names)]
    if left:
        errors.append(f"namespaces still present after cleanup: {left}")
    if errors:
        raise RigError("; ".join(errors))


def _wait_link_up(ns: str, dev: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = json.loads(_ip("-n", ns, "-j", "link", "show", "dev", dev))
        if info and "LOWER_UP" in info[0].get("flags", []):
            return
        if time.monotonic() > deadline:
            raise RigError(f"{ns}: {dev} has no carrier after {timeout}s: {info}")
        time.sleep(0.02)


def _add_namespace(name: str) -> None:
    start_reaper()  # before anything exists that it may have to remove
    _ip("netns", "add", name)
    # No duplicate address detection at all, so link-local and global addresses are usable
    # at once; a namespaced sysctl, the host's own setting is untouched.
    for key in ("default", "all"):
        run_in(name, ["sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0"], check=True)
    _ip("-n", name, "link", "set", "lo", "up")


def _link_target(net: Namespaces) -> None:
    """The veth pairs from the target to both scanners, addressed, up, with the scanners' routes."""
    links = (
        ("eth0", net.scanner, net.target_ip4, net.scanner_ip4, net.target_ip6, net.scanner_ip6),
        ("eth1", net.scanner2, net.target2_ip4, net.scanner2_ip4, net.target2_ip6,
         net.scanner2_ip6),
    )
    for tdev, peer_ns, t4, s4, t6, s6 in links:
        _ip("-n", net.target, "link", "add", tdev, "type", "veth",
            "peer", "name", "eth0", "netns", peer_ns)
        _ip("-n", net.target, "addr", "add", f"{t4}/24", "dev", tdev)
        _ip("-n", net.target, "addr", "add", f"{t6}/64", "dev", tdev, "nodad")
        _ip("-n", peer_ns, "addr", "add", f"{s4}/24", "dev", "eth0")
        _ip("-n", peer_ns, "addr", "add", f"{s6}/64", "dev", "eth0", "nodad")
        _ip("-n", net.target, "link", "set", tdev, "up")
        _ip("-n", peer_ns, "link", "set", "eth0", "up")
        _ip("-n", peer_ns, "route", "add", "default", "via", t4)
        _ip("-n", peer_ns, "-6", "route", "add", "default", "via", t6)
    for ns, dev in ((net.target, "eth0"), (net.target, "eth1"),
                    (net.scanner, "eth0"), (net.scanner2, "eth0")):
        _wait_link_up(ns, dev)


def create_namespaces(prefix: str) -> Namespaces:
    """Build the three-namespace topology described on `Namespaces`; nothing lands in the host's
    namespace (veth pairs are created inside the target namespace)."""
    net = Namespaces(
        prefix=prefix, target=f"{prefix}-tgt", scanner=f"{prefix}-scan", scanner2=f"{prefix}-scan2"
    )
    # Only what this call created is removed on failure: a name clash must not delete someone
    # else's namespace.
    created: list[str] = []
    try:
        for name in net.names:
            _add_namespace(name)
            created.append(name)
        _link_target(net)
    except BaseException:
        with contextlib.suppress(RigError):
            destroy_namespaces(created)
        raise
    return net


def recreate_target(net: Namespaces) -> None:
    """Delete the target namespace (and whatever runs in it) and build a new one of the same name
    and addresses, as a container restart does: its firewall, routes and sockets are all new."""
    destroy_namespaces([net.target])
    _add_namespace(net.target)
    _link_target(net)


def namespace_inode(ns: str) -> int:
    """The inode of the namespace's /proc/<pid>/ns/net; the kernel reuses these numbers."""
    return int(run_in(ns, ["stat", "-L", "-c", "%i", "/proc/self/ns/net"], check=True).stdout)


@contextlib.contextmanager
def namespaces_up(prefix: str | None = None) -> Iterator[Namespaces]:
    """The namespaces for the duration of a with-block, removed even when the block raises."""
    net = create_namespaces(prefix or new_prefix())
    try:
        yield net
    finally:
        destroy_namespaces(net.names)


# ---------------------------------------------------------------------------------------------
# Running commands inside a namespace


def eventually(check: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `check` until it returns a true value; files written after a log line need this."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
            detail = ""
        except AssertionError as error:
            detail = f": {error}"
        if time.monotonic() > deadline:
            raise RigError(f"{what} not met within {timeout}s{detail}")
        time.sleep(0.05)


def ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    # `ip netns exec` execs the command in place (no fork), so the pid we get is the command's.
    return ["ip", "netns", "exec", ns, *argv]


def run_in(
    ns: str,
    argv: Sequence[str],
    timeout: float = 30.0,
    *,
    check: bool = False,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` in namespace `ns` and capture its output as text; `check` raises with the
    output on a non-zero exit. A timeout kills the command and raises subprocess.TimeoutExpired."""
    proc = subprocess.run(
        ns_argv(ns, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=input_text,
        env=None if env is None else dict(env),
    )
    if check and proc.returncode != 0:
        raise RigError(
            f"in {ns}: {' '.join(argv)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def popen_in(
    ns: str,
    argv: Sequence[str],
    *,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` in namespace `ns` without waiting; the caller owns (and must reap) it."""
    return subprocess.Popen(
        ns_argv(ns, argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=None if env is None else dict(env),
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> tuple[int, bool]:
    """SIGTERM, then SIGKILL after `timeout`; returns (exit code, whether SIGKILL was needed).
    Not cut short by a signal: that would leave the process running, unreaped."""
    with Shield():
        if proc.poll() is not None:
            return proc.returncode, False
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout), False
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout), True


# ---------------------------------------------------------------------------------------------
# Scanner helpers


@dataclass(frozen=True, slots=True)
class TcpResult:
    """Outcome of one TCP connect: whether it was accepted and what the server sent before closing
    (or before the read timeout)."""

    connected: bool
    data: bytes = b""
    error: str = ""


@dataclass(frozen=True, slots=True)
class UdpResult:
    """Outcome of one datagram: the reply if one came, and whether an ICMP port-unreachable did."""

    reply: bytes | None
    refused: bool


_TCP_CLIENT = r"""
import json, socket, sys
addr, port, timeout, payload = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(timeout)
try:
    s.connect((addr, port))
except OSError as e:
    print(json.dumps({"connected": False, "error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
data = b""
try:
    if payload:
        s.sendall(bytes.fromhex(payload))
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except OSError:
    pass
print(json.dumps({"connected": True, "data": data.hex()}))
"""

_UDP_CLIENT = r"""
import json, socket, sys
addr, port, payload, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((addr, port))
s.send(bytes.fromhex(payload))
reply, refused = None, False
if wait > 0:
    s.settimeout(wait)
    try:
        reply = s.recv(65536).hex()
    except ConnectionRefusedError:
        refused = True
    except OSError:
        pass
print(json.dumps({"reply": reply, "refused": refused}))
"""


def _snippet(ns: str, code: str, args: Sequence[str], timeout: float) -> dict[str, object]:
    proc = run_in(ns, [sys.executable, "-c", code, *args], timeout=timeout, check=True)
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def tcp_connect(
    ns: str, addr: str, port: int, timeout: float = 3.0, *, send: bytes = b""
) -> TcpResult:
    """Connect from `ns` to addr:port, optionally send `send`, then read until EOF or `timeout`."""
    out = _snippet(ns, _TCP_CLIENT, [addr, str(port), str(timeout), send.hex()], timeout * 2 + 10)
    if not out["connected"]:
        return TcpResult(connected=False, error=str(out.get("error", "")))
    return TcpResult(connected=True, data=bytes.fromhex(str(out["data"])))


def udp_send(
    ns: str, addr: str, port: int, payload: bytes = b"x", *, reply_timeout: float = 0.0
) -> UdpResult:
    """Send one datagram from `ns`; with `reply_timeout` > 0, wait that long for a reply."""
    out = _snippet(
        ns, _UDP_CLIENT, [addr, str(port), payload.hex(), str(reply_timeout)], reply_timeout + 10
    )
    reply = out["reply"]
    return UdpResult(
        reply=None if reply is None else bytes.fromhex(str(reply)), refused=bool(out["refused"])
    )


def nmap(
    ns: str,
    args: Sequence[str],
    *,
    timeout: float = 120.0,
    max_retries: int = 1,
    host_timeout: str = "60s",
) -> subprocess.CompletedProcess[str]:
    """Run nmap in `ns` with -n -Pn and bounded retries/host timeout; `args` carry the scan type,
    ports and target (add "-6" for an IPv6 target). Raises if nmap itself fails."""
    if shutil.which("nmap") is None:
        raise RigError("nmap is not installed (run scripts/setup)")
    argv = ["nmap", "-n", "-Pn", "--max-retries", str(max_retries),
            "--host-timeout", host_timeout, *args]
    return run_in(ns, argv, timeout=timeout, check=True)


_NMAP_PORT_LINE = re.compile(r"^(\d+)/(tcp|udp)\s+(\S+)", re.MULTILINE)


def nmap_ports(output: str) -> dict[int, str]:
    """Port -> state ("open", "closed", "filtered", "open|filtered", ...) from nmap's normal
    output. Ports nmap folds into a "Not shown: N closed ports" line do not appear."""
    return {int(m.group(1)): m.group(3) for m in _NMAP_PORT_LINE.finditer(output)}


# ---------------------------------------------------------------------------------------------
# Plain listeners in a namespace (stand-ins for real services)

_SERVER = r"""
import socket, sys
proto, port, banner = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
if proto == "tcp":
    s.listen(64)
print("ready", flush=True)

def host(peer):
    return peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]

while True:
    if proto == "tcp":
        c, peer = s.accept()
        print("peer", host(peer), "-", flush=True)
        try:
            c.sendall(banner)
        except OSError:
            pass
        c.close()
    else:
        data, peer = s.recvfrom(65536)
        print("peer", host(peer), data.hex() or "-", flush=True)
        s.sendto(banner or data, peer)
"""


@dataclass(frozen=True, slots=True)
class Hit:
    """One connection or datagram a Listener received."""

    peer: str
    payload: bytes


class Listener:
    """A trivial dual-stack TCP or UDP server in a namespace that answers with a fixed banner
    (UDP: echoes when the banner is empty) and records who talked to it."""

    def __init__(self, ns: str, proto: str, port: int, banner: bytes = b"") -> None:
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be 'tcp' or 'udp', not {proto!r}")
        self.ns, self.proto, self.port = ns, proto, port
        self._proc = popen_in(
            ns, [sys.executable, "-c", _SERVER, proto, str(port), banner.hex() or ""],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._hits: list[Hit] = []
        self._cond = threading.Condition()
        self._ready = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self._proc.poll() is not None, 10):
                self.close()
                raise RigError(f"{proto} listener on {ns}:{port} did not start")
        if not self._ready:
            err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
            self.close()
            raise RigError(f"{proto} listener on {ns}:{port} failed: {err}")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode(errors="replace").split()
            with self._cond:
                if line == ["ready"]:
                    self._ready = True
                elif len(line) == 3 and line[0] == "peer":
                    payload = b"" if line[2] == "-" else bytes.fromhex(line[2])
                    self._hits.append(Hit(peer=line[1], payload=payload))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def hits(self) -> list[Hit]:
        with self._cond:
            return list(self._hits)

    def wait_for_peer(self, peer: str, timeout: float = 5.0) -> Hit:
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(h.peer == peer for h in self._hits), timeout
            )
            if not found:
                raise RigError(f"no {self.proto} hit from {peer} on port {self.port}: {self._hits}")
            return next(h for h in self._hits if h.peer == peer)

    def close(self) -> None:
        with Shield():
            stop_process(self._proc, timeout=2.0)
            for stream in (self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    stream.close()
            self._reader.join(timeout=2.0)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Syslog


@dataclass(frozen=True, slots=True)
class SyslogRecord:
    """One RFC 3164 datagram: `<pri>Mmm dd hh:mm:ss [host ]ident[pid]: message`."""

    pri: int
    timestamp: str
    hostname: str | None
    ident: str
    pid: int | None
    message: str

    @property
    def facility(self) -> int:
        return self.pri >> 3

    @property
    def severity(self) -> int:
        return self.pri & 7


_RFC3164 = re.compile(
    r"<(?P<pri>\d{1,3})>"
    r"(?P<ts>[A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2}) "
    r"(?:(?P<host>[^\s\[\]:]+) )?"
    r"(?P<ident>[^\s\[\]:]+)(?:\[(?P<pid>[0-9]+)\])?: "
    r"(?P<msg>.*)",
    re.DOTALL,
)


def parse_syslog(datagram: bytes) -> SyslogRecord | None:
    """Parse one datagram, or None when it is not RFC 3164 (including a PRI above 191).
    Trailing newlines and NULs are dropped: clients differ in whether they send them."""
    text = datagram.decode("utf-8", errors="replace").rstrip("\n\x00")
    m = _RFC3164.fullmatch(text)
    if m is None or int(m["pri"]) > 191:
        return None
    return SyslogRecord(
        pri=int(m["pri"]),
        timestamp=m["ts"],
        hostname=m["host"],
        ident=m["ident"],
        pid=int(m["pid"]) if m["pid"] else None,
        message=m["msg"],
    )


Pattern = str | re.Pattern[str]


def _matches(pattern: Pattern, message: str) -> bool:
    if isinstance(pattern, str):
        return pattern in message
    return pattern.search(message) is not None


class SyslogReceiver:
    """Binds a Unix datagram socket at `path` (as /dev/log would be) and collects every datagram
    in a background thread. Plain-text patterns match as substrings, compiled ones with search().
    `since` arguments are indices from mark(), to look only at messages after some point."""

    def __init__(self, path: Path) -> None:
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise RigError(f"syslog socket path too long for AF_UNIX: {path}")
        self.path = path
        self._records: list[SyslogRecord] = []
        self._malformed: list[bytes] = []
        self._cond = threading.Condition()
        self._receiver = DatagramReceiver(path, self._keep, name="syslog-receiver")

    def _keep(self, data: bytes, _at: float) -> None:
        record = parse_syslog(data)
        with self._cond:
            if record is None:
                self._malformed.append(data)
            else:
                self._records.append(record)
            self._cond.notify_all()

    def records(self, since: int = 0) -> list[SyslogRecord]:
        with self._cond:
            return self._records[since:]

    def messages(self, since: int = 0) -> list[str]:
        return [r.message for r in self.records(since)]

    def malformed(self) -> list[bytes]:
        """Datagrams that were not RFC 3164; a correct daemon sends none."""
        with self._cond:
            return list(self._malformed)

    def mark(self) -> int:
        """Index of the next message to arrive, for `since=`."""
        with self._cond:
            return len(self._records)

    def find(self, pattern: Pattern, since: int = 0) -> SyslogRecord | None:
        with self._cond:
            return next((r for r in self._records[since:] if _matches(pattern, r.message)), None)

    def find_all(self, pattern: Pattern, since: int = 0) -> list[SyslogRecord]:
        with self._cond:
            return [r for r in self._records[since:] if _matches(pattern, r.message)]

    def wait_any(self, timeout: float) -> None:
        """Sleep until any new datagram arrives or `timeout` passes."""
        with self._cond:
            seen = len(self._records) + len(self._malformed)
            self._cond.wait_for(
                lambda: len(self._records) + len(self._malformed) != seen, timeout
            )

    def wait_for(self, pattern: Pattern, timeout: float = 10.0, since: int = 0) -> SyslogRecord:
        """The first message (from `since` on) matching `pattern`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self._records[since:]:
                    if _matches(pattern, record.message):
                        return record
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no syslog message matching {pattern!r} within {timeout}s; "
                        f"seen since #{since}:\n{self._describe(since)}"
                    )
                self._cond.wait(left)

    def wait_count(
        self, pattern: Pattern, count: int, timeout: float = 10.0, since: int = 0
    ) -> list[SyslogRecord]:
        """Wait until at least `count` messages match; returns them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [r for r in self._records[since:] if _matches(pattern, r.message)]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{len(hits)} of {count} syslog messages matching {pattern!r} within "
                        f"{timeout}s; seen since #{since}:\n{self._describe(since)}"
                    )
                self._cond.wait(left)

    def assert_absent(self, pattern: Pattern, wait: float = 1.0, since: int = 0) -> None:
        """Wait `wait` seconds, then fail if any message from `since` on matches."""
        time.sleep(wait)
        hit = self.find(pattern, since)
        if hit is not None:
            raise AssertionError(
                f"unexpected syslog message matching {pattern!r}: {hit.message!r}; seen since "
                f"#{since}:\n{self.describe(since)}"
            )

    def describe(self, since: int = 0) -> str:
        with self._cond:
            return self._describe(since)

    def _describe(self, since: int) -> str:
        lines = [f"  {r.ident}[{r.pid}] <{r.pri}> {r.message}" for r in self._records[since:]]
        lines += [f"  MALFORMED {raw!r}" for raw in self._malformed]
        return "\n".join(lines) or "  (nothing)"

    def close(self) -> None:
        with Shield():
            self._receiver.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> SyslogReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The daemon under test

# 1.2's shipped port lists; tests usually override them with a few ports.
CLASSIC_TCP_PORTS = (
    "1,11,15,79,111,119,143,540,635,1080,1524,2000,5742,6667,12345,12346,20034,27665,31337,"
    "32771,32772,32773,32774,40421,49724,54320"
)
CLASSIC_UDP_PORTS = (
    "1,7,9,69,161,162,513,635,640,641,700,37444,34555,31335,32770,32771,32772,32773,32774,"
    "31337,54321"
)

DAEMON_COMMAND: tuple[str, ...] = (sys.executable, "-m", "portsentry")


# Commands that write their own syslog lines when they work without the daemon (service.audit).
_SAYS_ITSELF = ("block", "unblock", "flush")


def cli_argv(conf: Path | str, *args: str) -> list[str]:
    """`portsentry ARGS -c CONF`. A ban-changing command writes its own lines to no syslog unless
    the test names a socket: the host's /dev/log (journald on a workstation) is not the test's."""
    argv = [sys.executable, "-m", "portsentry", *args, "-c", str(conf)]
    if args and args[0] in _SAYS_ITSELF and "--syslog-socket" not in args and "--no-syslog" not in args:
        argv.append("--no-syslog")
    return argv


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Daemon:
    """One PortSentry process in the target namespace, with every file it touches in `workdir`.

    `config` overrides the defaults key by key (a value of None drops the key); the file is
    written in the classic `KEY="value"` form. `modes` are the classic flags ("-tcp" or "tcp").
    """

    def __init__(
        self,
        net: Namespaces,
        workdir: Path,
        syslog: SyslogReceiver,
        modes: Sequence[str] = ("-tcp",),
        *,
        verbose: bool = False,
        ignore: Sequence[str] = ("127.0.0.1/32",),
        extra_args: Sequence[str] = (),
        command: Sequence[str] = DAEMON_COMMAND,
        config: Mapping[str, str | None] | None = None,
    ) -> None:
        self.net, self.workdir, self.syslog = net, workdir, syslog
        self.modes = [m if m.startswith("-") else f"-{m}" for m in modes]
        self.verbose, self.extra_args, self.command = verbose, list(extra_args), list(command)
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path = workdir / "portsentry.conf"
        self.history_path = workdir / "portsentry.history"
        self.blocked_path = workdir / "portsentry.blocked"
        self.ignore_path = workdir / "portsentry.ignore"
        self.hosts_deny_path = workdir / "hosts.deny"
        self.stdout_path = workdir / "daemon.stdout"
        self.stderr_path = workdir / "daemon.stderr"
        settings: dict[str, str | None] = {
            "TCP_PORTS": CLASSIC_TCP_PORTS,
            "UDP_PORTS": CLASSIC_UDP_PORTS,
            "ADVANCED_PORTS_TCP": "1024",
            "ADVANCED_PORTS_UDP": "1024",
            "ADVANCED_EXCLUDE_TCP": "113,139",
            "ADVANCED_EXCLUDE_UDP": "520,138,137,67",
            "IGNORE_FILE": str(self.ignore_path),
            "HISTORY_FILE": str(self.history_path),
            "BLOCKED_FILE": str(self.blocked_path),
            "HOSTS_DENY_FILE": str(self.hosts_deny_path),
            "STATE_DIR": str(workdir / "state"),
            # Beside the syslog socket: sun_path is short, test temp dirs are long.
            "CONTROL_SOCKET": str(syslog.path.parent / f"ctl-{workdir.name}" / "control.sock"),
            "BLOCK_TCP": "0",
            "BLOCK_UDP": "0",
            "SCAN_TRIGGER": "0",
        }
        settings.update(config or {})
        self.config = {k: v for k, v in settings.items() if v is not None}
        self.ignore = list(ignore)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_mark = 0
        self.returncode: int | None = None
        self.hung = False
        self._files: list[IO[bytes]] = []

    def write_files(self) -> None:
        lines = [f'{key}="{value}"' for key, value in self.config.items()]
        self.conf_path.write_text("# written by tests/system/rig.py\n" + "\n".join(lines) + "\n")
        self.ignore_path.write_text("".join(f"{entry}\n" for entry in self.ignore))
        self.hosts_deny_path.touch()

    def argv(self) -> list[str]:
        return [
            *self.command, "-c", str(self.conf_path), "--syslog-socket", str(self.syslog.path),
            "--log-stderr", *(["-v"] if self.verbose else []), *self.modes, *self.extra_args,
        ]

    def start(self, *, wait_ready: bool = True, timeout: float = 20.0) -> Daemon:
        """Write the files and launch; with `wait_ready`, block until the readiness line and fail
        (with stderr and syslog) if the process exits first."""
        if self.proc is not None and self.proc.poll() is None:
            raise RigError("daemon already started")
        self.proc = None
        self.returncode = None
        self.write_files()
        self.start_mark = self.syslog.mark()
        out = self.stdout_path.open("wb")
        err = self.stderr_path.open("wb")
        self._files = [out, err]
        self.proc = popen_in(self.net.target, self.argv(), stdout=out, stderr=err,
                             env=daemon_env())
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> SyslogRecord:
        proc = self._started()
        deadline = time.monotonic() + timeout
        while True:
            record = self.syslog.find(READY_TEXT, self.start_mark)
            if record is not None:
                return record
            if proc.poll() is not None:
                raise RigError(f"daemon exited {proc.returncode} before it was ready\n"
                               f"{self.report()}")
            if time.monotonic() > deadline:
                raise RigError(f"daemon not ready after {timeout}s\n{self.report()}")
            self.syslog.wait_any(0.1)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """For tests of startup failures: the exit code, failing if it keeps running."""
        proc = self._started()
        try:
            self.returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RigError(f"daemon still running after {timeout}s\n{self.report()}") from None
        self._close_files()
        return self.returncode

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL after `timeout` (then `hung` is set). Returns the exit code."""
        proc = self._started()
        with Shield():
            self.returncode, killed = stop_process(proc, timeout)
            self.hung = self.hung or killed
            self._close_files()
        return self.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self._started().pid

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RigError("daemon not started")
        return self.proc

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def blocked_file(self, mode: str) -> Path:
        """1.2 keeps one blocked file per mode: BLOCKED_FILE + "." + mode."""
        return Path(f"{self.blocked_path}.{mode.lstrip('-')}")

    def stderr_text(self) -> str:
        return _read_text(self.stderr_path)

    def history_text(self) -> str:
        return _read_text(self.history_path)

    def hosts_deny_text(self) -> str:
        return _read_text(self.hosts_deny_path)

    def report(self) -> str:
        """Everything useful when a daemon test fails."""
        return (
            f"argv: {' '.join(self.argv())}\n"
            f"config:\n{_read_text(self.conf_path)}"
            f"stderr:\n{self.stderr_text()}\n"
            f"stdout:\n{_read_text(self.stdout_path)}\n"
            f"syslog:\n{self.syslog.describe(self.start_mark)}"
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def short_socket_dir() -> Path:
    """A private directory with a short path for Unix sockets (pytest's tmp_path can exceed
    AF_UNIX's 107-byte limit), named after the run so that its reaper finds it."""
    return run_tempdir("sock")


class DaemonFactory(Protocol):
    """The `daemon_factory` fixture: builds (and by default starts) a Daemon; config keys are
    keyword arguments, e.g. `daemon_factory("-tcp", TCP_PORTS="1,2", BLOCK_TCP="1")`."""

    def __call__(
        self,
        *modes: str,
        start: bool = True,
        verbose: bool = False,
        ignore: Sequence[str] = ("127.0.0.1/32",),
        extra_args: Sequence[str] = (),
        **config: str | None,
    ) -> Daemon: ...
