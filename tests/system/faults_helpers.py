"""Helpers for the fault-injection system tests: extra scanner addresses and connect bursts from
them, a private mount namespace to run the daemon in (for a tiny tmpfs or a substitute
resolv.conf, invisible to the host), and the daemon's bans as nftables, hosts.deny and the store
show them."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.system.rig import Daemon, RigError, daemon_env, popen_in, run_in, stop_process

# Connects from each source address in turn (the socket is bound to it), printing one line per
# attempt, so a burst from many "hosts" needs one process rather than one per address.
_BURST = r"""
import socket, sys, time
target, port, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for source in sys.argv[4:]:
    s = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.bind((source, 0))
        s.connect((target, port))
        result = "connected"
    except OSError as e:
        result = type(e).__name__
    print(f"{time.time():.6f} {source} {result}", flush=True)
    s.close()
    time.sleep(gap)
"""


def add_addresses(ns: str, addresses: Sequence[str], dev: str = "eth0") -> None:
    """Give `ns` more addresses on `dev`, so it can act as many scanners."""
    for address in addresses:
        run_in(ns, ["ip", "addr", "add", f"{address}/32", "dev", dev], check=True)


def start_burst(
    ns: str, target: str, port: int, sources: Sequence[str], gap: float = 0.0
) -> subprocess.Popen[bytes]:
    """Connect to target:port once from each of `sources`, `gap` seconds apart, in the background."""
    return popen_in(
        ns, [sys.executable, "-c", _BURST, target, str(port), str(gap), *sources],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish_burst(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> dict[str, tuple[float, str]]:
    """Wait for a burst; source -> (time of the attempt, outcome)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise RigError(f"connect burst still running after {timeout}s") from None
    if proc.returncode != 0:
        raise RigError(f"connect burst failed ({proc.returncode}): {err.decode(errors='replace')}")
    results: dict[str, tuple[float, str]] = {}
    for line in out.decode().splitlines():
        stamp, source, outcome = line.split()
        results[source] = (float(stamp), outcome)
    return results


def connect_from(ns: str, source: str, target: str, port: int) -> tuple[float, str]:
    """One connect from `source`: (wall-clock time right after it, outcome)."""
    proc = start_burst(ns, target, port, [source])
    return finish_burst(proc)[source]


class MountNamespace:
    """A process that holds a private mount namespace inside network namespace `ns`, set up by
    the shell text `setup` (mounts). The daemon joins it with `nsenter -m` (see `command`), so
    it sees those mounts while the host and the test process do not; it lives until `close()`,
    so the daemon can be stopped and started again in the same mounts."""

    def __init__(self, ns: str, setup: str, timeout: float = 10.0) -> None:
        script = f"set -e\n{setup}\necho ready\nexec sleep 3600\n"
        self._proc = popen_in(
            ns, ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            stop_process(self._proc, timeout=2.0)
            err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
            self._close_pipes()
            raise RigError(f"mount namespace setup failed: {setup!r}: {err}")

    @property
    def pid(self) -> int:
        # `ip netns exec`, `unshare` and `sh` all exec in place: this pid is the holder's.
        return self._proc.pid

    @property
    def command(self) -> tuple[str, ...]:
        """The daemon's command line inside these mounts (nsenter -m execs in place too)."""
        return ("nsenter", "-t", str(self.pid), "-m", "--", sys.executable, "-m", "portsentry")

    def run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `argv` in these mounts (in the test's own network namespace)."""
        proc = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "--", *argv],
                              capture_output=True, text=True, timeout=30, check=False)
        if check and proc.returncode != 0:
            raise RigError(f"in mount namespace: {' '.join(argv)} exited {proc.returncode}: "
                           f"{proc.stderr.strip()}")
        return proc

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(5.0)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> MountNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def daemon_running(daemon: Daemon, *, start: bool = True) -> Iterator[Daemon]:
    """Start `daemon` and always stop it afterwards; a daemon that ignores SIGTERM fails the test."""
    try:
        if start:
            daemon.start()
        yield daemon
    finally:
        if daemon.proc is not None:
            daemon.stop()
    if daemon.hung:
        raise RigError(f"daemon did not exit within 10s of SIGTERM\n{daemon.report()}")


def nft_set(ns: str, name: str = "blocked4") -> list[str]:
    """Addresses in our nftables set inside `ns`, duplicates (if the kernel ever showed any) kept."""
    out = run_in(ns, ["nft", "-j", "list", "set", "inet", "portsentry", name]).stdout
    if not out.strip():
        return []
    elements: list[str] = []
    for item in json.loads(out)["nftables"]:
        for element in item.get("set", {}).get("elem", []):
            value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
            elements.append(str(value))
    return elements


def store_addresses(daemon: Daemon) -> list[str]:
    """Addresses of the active bans, as `portsentry list --json` shows them."""
    argv = [*daemon.command, "list", "--json", "-c", str(daemon.conf_path)]
    result = run_in(daemon.net.target, argv, env=daemon_env())
    if result.returncode != 0:
        raise RigError(f"portsentry list failed ({result.returncode}): {result.stderr}")
    return [str(row["address"]) for row in json.loads(result.stdout)]


def pids_named(ns: str, argv: Sequence[str]) -> list[int]:
    """Processes in network namespace `ns` whose command line is exactly `argv`."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                         check=False).stdout
    wanted = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    found = []
    for pid in (int(p) for p in out.split()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes() == wanted:
                found.append(pid)
    return found


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# Answers every PTR query with the name argv[2] maps its question to (else argv[3]) and logs each
# query, so a test controls exactly what reverse DNS tells the daemon.
_DNS = r"""
import json, socket, struct, sys
names, default = json.loads(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    try:
        qid, flags = struct.unpack("!HH", data[:4])
        pos, labels = 12, []
        while data[pos]:
            labels.append(data[pos + 1:pos + 1 + data[pos]].decode("latin-1"))
            pos += 1 + data[pos]
        qtype = struct.unpack("!H", data[pos + 1:pos + 3])[0]
        question = data[12:pos + 5]
    except (IndexError, struct.error):
        continue
    qname = ".".join(labels).lower()
    print("query", qtype, qname, flush=True)
    answer, count = b"", 0
    if qtype == 12:
        name = names.get(qname, default).encode("latin-1")
        rdata = b"".join(bytes([len(label)]) + label for label in name.split(b".")) + b"\0"
        answer, count = b"\xc0\x0c" + struct.pack("!HHIH", 12, 1, 60, len(rdata)) + rdata, 1
    s.sendto(struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, count, 0, 0)
             + question + answer, peer)
"""


def reverse_name(address: str) -> str:
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa"


class DnsResponder:
    """A UDP DNS server on address:53 in `ns` that hands out the PTR names it is told."""

    def __init__(self, ns: str, address: str, names: dict[str, str], default: str) -> None:
        mapping = {reverse_name(ip): name for ip, name in names.items()}
        self._proc = popen_in(ns, [sys.executable, "-c", _DNS, address, json.dumps(mapping), default],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], 10.0)
        if not ready or self._proc.stdout.readline().strip() != b"ready":
            self.close()
            raise RigError(f"DNS responder on {ns} {address}:53 did not start")

    def close(self) -> list[str]:
        """Stop; returns the log of queries ("query <type> <name>")."""
        stop_process(self._proc, timeout=2.0)
        out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
        return out.splitlines()
