"""Measure the ban backends: time to add and to remove one ban with 0, 10k and 100k bans active
(nftables via netlink, one `nft` process per ban, a long-lived `nft -i`, and `nft -f -`; ipset; the
route backend; and 1.2's classic KILL_ROUTE run through `sh -c` as 1.2's system() does, with
iptables and with `ip route`), time to restore 100k bans (each backend's bulk path, and the
daemon's own restart path: ban store read plus nftables), and what 100k linear iptables rules
cost on the packet path compared with one set lookup (TCP connect latency).

Run as root from the repository root: `python bench/ban_backends.py` (about 1.5 minutes here;
capped at 9), or as part of `bench/run` (`--only bans`). It builds throwaway namespaces
(198.18.0.0/15, fd00::/8) with tests/system/rig.py and re-runs itself inside the target namespace
(`--inner`), which refuses to run in the host's namespace; nothing is ever done to the host's own
firewall or routes.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# bench/run --ours-rev points this at an exported revision's src/.
SOURCE_ENV = "PORTSENTRY_BENCH_SRC"
sys.path[:0] = [os.environ.get(SOURCE_ENV, str(REPO_ROOT / "src")), str(REPO_ROOT)]

from portsentry.bans.lifecycle import BanManager, BanPolicy  # noqa: E402
from portsentry.bans.restore import restore_bans  # noqa: E402
from portsentry.bans.store import BanStore  # noqa: E402
from portsentry.responders.backend import run_argv  # noqa: E402
from portsentry.responders.hostsdeny import HostsDeny  # noqa: E402
from portsentry.responders.iproute import RouteBackend  # noqa: E402
from portsentry.responders.ipset import IpsetBackend  # noqa: E402
from portsentry.responders.nftables import NftablesBackend  # noqa: E402

FILLS = (0, 10_000, 100_000)
PORT = 8080
DEADLINE = 9 * 60.0
# Fill addresses: 198.18.2.0 upwards (never the rig's 198.18.0.x/198.18.1.x hosts; 100k of them
# end at 198.19.136.161); probes (the single bans being timed, at most 1000) come from
# 198.19.200.0 upwards, so a timed add never finds its address already banned.
FILL_BASE = int(IPv4Address("198.18.2.0"))
PROBE_BASE = int(IPv4Address("198.19.200.0"))
Row = dict[str, Any]


def fill_addresses(count: int) -> list[IPv4Address]:
    return [IPv4Address(FILL_BASE + i) for i in range(count)]


def probe_addresses(count: int) -> Iterator[IPv4Address]:
    for i in range(count):
        yield IPv4Address(PROBE_BASE + i)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000,
        "n": len(ordered),
    }


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def must(argv: list[str], stdin: str | None = None) -> None:
    result = run_argv(argv, stdin)
    if not result.ok:
        raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.strip()}")


# ---------------------------------------------------------------------------------------------
# Mechanisms measured for single adds/removes


class NftInteractive:
    """Mechanism (b): one long-lived `nft -i`, each command followed by a lookup of a set that
    does not exist, whose error message tells us the command before it has finished."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["nft", "-i"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        self.marker = 0

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.marker += 1
        tag = f"sync{self.marker}"
        self.proc.stdin.write(f"{text}\nlist set inet portsentry {tag}\n".encode())
        seen = b""
        while tag.encode() not in seen:
            ready, _, _ = select.select([self.proc.stdout], [], [], 10)
            if not ready:
                raise SystemExit(f"nft -i: no answer to {text!r}")
            seen += os.read(self.proc.stdout.fileno(), 65536)
        if seen.count(b"Error") > 1:
            raise SystemExit(f"nft -i: {text!r} failed: {seen.decode(errors='replace')}")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(5)


def measure_single(add: Callable[[IPv4Address], object], remove: Callable[[IPv4Address], object],
                   samples: int) -> dict[str, dict[str, float]]:
    addresses = list(probe_addresses(samples))
    adds = [timed(lambda a=a: add(a)) for a in addresses]  # type: ignore[misc]
    removes = [timed(lambda a=a: remove(a)) for a in addresses]  # type: ignore[misc]
    return {"add": summary(adds), "remove": summary(removes)}


def bench_nft(kind: str, fill: int, samples: int) -> Row:
    backend = NftablesBackend(mechanism="cli" if kind == "nft -f - (fallback)" else "netlink")
    backend.setup()
    bans = [(a, 3600.0) for a in fill_addresses(fill)]
    restore = timed(lambda: backend.add_many(bans))
    table = "element inet portsentry blocked4"
    if kind == "nft netlink (chosen)" or kind == "nft -f - (fallback)":
        result = measure_single(lambda a: backend.add(a, 3600), backend.remove, samples)
    elif kind == "nft process per ban":
        result = measure_single(
            lambda a: must(["nft", "add", *table.split(), f"{{ {a} timeout 3600s }}"]),
            lambda a: must(["nft", "delete", *table.split(), f"{{ {a} }}"]),
            samples)
    else:
        nft = NftInteractive()
        try:
            result = measure_single(
                lambda a: nft.command(f"add {table} {{ {a} timeout 3600s }}"),
                lambda a: nft.command(f"delete {table} {{ {a} }}"),
                samples)
        finally:
            nft.close()
    backend.teardown()
    return {"backend": kind, "active": fill, "fill_s": restore, **result}


def bench_ipset(fill: int, samples: int) -> Row:
    backend = IpsetBackend()
    backend.setup()
    restore = timed(lambda: backend.add_many([(a, 3600.0) for a in fill_addresses(fill)]))
    result = measure_single(lambda a: backend.add(a, 3600), backend.remove, samples)
    backend.teardown()
    return {"backend": "ipset (process per ban)", "active": fill, "fill_s": restore, **result}


def bench_route(fill: int, samples: int) -> Row:
    backend = RouteBackend()
    backend.setup()
    restore = timed(lambda: backend.add_many([(a, 3600.0) for a in fill_addresses(fill)]))
    result = measure_single(lambda a: backend.add(a, 3600), backend.remove, samples)
    backend.teardown()
    return {"backend": "route (process per ban)", "active": fill, "fill_s": restore, **result}


def iptables_fill(fill: int) -> float:
    lines = ["*filter"] + [f"-A INPUT -s {a}/32 -j DROP" for a in fill_addresses(fill)] + ["COMMIT", ""]
    return timed(lambda: must(["iptables-restore", "--noflush"], "\n".join(lines)))


def shell(command: str) -> None:
    """One KILL_ROUTE the way 1.2 runs it: system(3), i.e. `sh -c COMMAND`."""
    must(["/bin/sh", "-c", command])


CLASSIC_IPTABLES = "1.2 KILL_ROUTE iptables"
CLASSIC_ROUTE = "1.2 KILL_ROUTE ip route"


def bench_iptables(fill: int, samples: int) -> Row:
    """1.2's `KILL_ROUTE="/sbin/iptables -I INPUT -s $TARGET$ -j DROP"`: one rule per ban. 1.2 never
    removes a ban; the removal timed is the matching `iptables -D` an admin would run."""
    restore = iptables_fill(fill) if fill else 0.0
    result = measure_single(
        lambda a: shell(f"/sbin/iptables -w -I INPUT -s {a} -j DROP"),
        lambda a: shell(f"/sbin/iptables -w -D INPUT -s {a} -j DROP"),
        samples)
    must(["iptables", "-F", "INPUT"])
    return {"backend": CLASSIC_IPTABLES, "active": fill, "fill_s": restore, **result}


def bench_classic_route(fill: int, samples: int) -> Row:
    """`KILL_ROUTE="/sbin/ip route add blackhole $TARGET$"` (what bench/run gives both daemons)."""
    script = "".join(f"route add blackhole {a}\n" for a in fill_addresses(fill))
    restore = timed(lambda: must(["ip", "-batch", "-"], script)) if fill else 0.0
    result = measure_single(
        lambda a: shell(f"/sbin/ip route add blackhole {a}"),
        lambda a: shell(f"/sbin/ip route del blackhole {a}"),
        samples)
    must(["ip", "-4", "route", "flush", "type", "blackhole"])
    return {"backend": CLASSIC_ROUTE, "active": fill, "fill_s": restore, **result}


def bench_daemon_restore(count: int) -> Row:
    """The daemon's restart path (BanManager.restore: expire, read the active bans from the SQLite
    ban store, one nftables add_many) with `count` bans in the store; also the store's write time
    per ban while it fills."""
    with tempfile.TemporaryDirectory(prefix="ps-bench-bans-") as directory:
        store = BanStore(os.path.join(directory, "bans.sqlite"))
        now = time.time()
        writes: list[float] = []
        for address in fill_addresses(count):
            writes.append(timed(lambda a=address: store.ban(  # type: ignore[misc]
                a, reason="bench", mode="atcp", port=79, now=now, duration=3600.0,
                backends=("nftables",))))
        backend = NftablesBackend()
        backend.setup()
        manager = BanManager(store, backend, HostsDeny(os.path.join(directory, "hosts.deny")),
                             BanPolicy(), lambda _line: None)
        try:
            restored: list[object] = []
            seconds = timed(lambda: restored.extend(restore_bans(manager, time.time()).banned))
            members = len(backend.members())
        finally:
            backend.teardown()
            store.close()
    tail = writes[-min(1000, len(writes)):]
    return {"backend": "daemon restore (store + nft netlink)", "bans": count,
            "restore_s": seconds, "restored": len(restored), "members": members,
            "store_write": summary(tail)}


# ---------------------------------------------------------------------------------------------
# Packet path

_CONNECTS = r"""
import json, socket, sys, time
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    t = time.perf_counter()
    s.connect((addr, port))
    out.append(time.perf_counter() - t)
    s.close()
print(json.dumps(out))
"""


def serve(stop: threading.Event) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", PORT))
    server.listen(128)
    server.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        conn.close()
    server.close()


def connect_latency(scanner_ns: str, target_ip: str, count: int = 300) -> dict[str, float]:
    argv = ["ip", "netns", "exec", scanner_ns, sys.executable, "-c", _CONNECTS, target_ip,
            str(PORT), str(count)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    return summary(json.loads(proc.stdout))


def bench_packet_path(scanner_ns: str, target_ip: str, fill: int) -> list[Row]:
    rows = [{"setup": "no rules", **connect_latency(scanner_ns, target_ip)}]
    nft = NftablesBackend()
    nft.setup()
    nft.add_many([(a, 3600.0) for a in fill_addresses(fill)])
    rows.append({"setup": f"nft set, {fill} members", **connect_latency(scanner_ns, target_ip)})
    nft.teardown()
    ipset = IpsetBackend()
    ipset.setup()
    ipset.add_many([(a, 3600.0) for a in fill_addresses(fill)])
    rows.append({"setup": f"ipset, {fill} members", **connect_latency(scanner_ns, target_ip)})
    ipset.teardown()
    iptables_fill(fill)
    rows.append({"setup": f"iptables, {fill} linear rules",
                 **connect_latency(scanner_ns, target_ip, 100)})
    must(["iptables", "-F", "INPUT"])
    return rows


# ---------------------------------------------------------------------------------------------


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def inner(scanner_ns: str, target_ip: str, launcher_netns: str) -> None:
    """The measurements; runs inside the target namespace only (the launcher passes the inode of
    its own namespace, and this refuses to go on if it is still in it)."""
    if str(netns_inode()) == launcher_netns:
        raise SystemExit("ban_backends --inner must run inside a benchmark namespace")
    started = time.monotonic()
    out: dict[str, list[Row]] = {"single": [], "restore": [], "path": [], "daemon": []}
    kinds = ["nft netlink (chosen)", "nft -i long-lived", "nft process per ban",
             "nft -f - (fallback)"]
    for fill in FILLS:
        for kind in kinds:
            samples = 1000 if kind == "nft netlink (chosen)" else 200 if kind == "nft -i long-lived" \
                else 20
            out["single"].append(bench_nft(kind, fill, samples))
        out["single"].append(bench_ipset(fill, 50))
        out["single"].append(bench_route(fill, 50))
        out["single"].append(bench_classic_route(fill, 50))
        if time.monotonic() - started < DEADLINE / 3:
            out["single"].append(bench_iptables(fill, 5 if fill >= 100_000 else 20))
        print(f"  ... {fill} active done after {time.monotonic() - started:.0f}s", file=sys.stderr)
    bans = [(a, 3600.0) for a in fill_addresses(100_000)]
    backends: tuple[tuple[str, NftablesBackend | IpsetBackend | RouteBackend], ...] = (
        ("nft netlink", NftablesBackend()), ("nft -f -", NftablesBackend(mechanism="cli")),
        ("ipset restore", IpsetBackend()), ("route ip -batch", RouteBackend()))
    for name, backend in backends:
        total = timed(lambda b=backend: (b.setup(), b.add_many(bans)))  # type: ignore[misc]
        again = timed(lambda b=backend: b.add_many(bans))  # type: ignore[misc]
        count = len(backend.members())
        backend.teardown()
        out["restore"].append({"backend": name, "setup_and_restore_s": total,
                               "restore_again_s": again, "members": count})
    out["daemon"].append(bench_daemon_restore(100_000))
    print(f"  ... restores done after {time.monotonic() - started:.0f}s", file=sys.stderr)
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(stop,), daemon=True)
    server.start()
    try:
        out["path"] = bench_packet_path(scanner_ns, target_ip, 100_000)
    finally:
        stop.set()
        server.join(2)
    json.dump(out, sys.stdout)


def print_tables(out: dict[str, list[Row]]) -> None:
    print("\nOne ban added / removed (milliseconds, median and p95) with N bans active")
    print(f"{'backend':26} {'active':>7} {'add med':>8} {'add p95':>8} {'rm med':>8} "
          f"{'rm p95':>8} {'n':>5} {'fill s':>7}")
    for r in out["single"]:
        print(f"{r['backend']:26} {r['active']:>7} {r['add']['median_ms']:8.3f} "
              f"{r['add']['p95_ms']:8.3f} {r['remove']['median_ms']:8.3f} "
              f"{r['remove']['p95_ms']:8.3f} {r['add']['n']:>5} {r['fill_s']:7.2f}")
    print("\nRestore of 100k bans (add_many), seconds")
    print(f"{'backend':16} {'setup+restore':>14} {'again (refresh)':>16} {'members':>8}")
    for r in out["restore"]:
        print(f"{r['backend']:16} {r['setup_and_restore_s']:14.2f} {r['restore_again_s']:16.2f} "
              f"{r['members']:>8}")
    for r in out.get("daemon", []):
        print(f"\n{r['backend']}: {r['bans']} bans in the store, restored in {r['restore_s']:.2f} s "
              f"({r['members']} set members); store write per ban {r['store_write']['median_ms']:.3f} ms "
              f"median, {r['store_write']['p95_ms']:.3f} ms p95")
    print("\nPacket path: TCP connect latency from an unbanned scanner (milliseconds)")
    print(f"{'setup':34} {'median':>8} {'p95':>8} {'n':>5}")
    for r in out["path"]:
        print(f"{r['setup']:34} {r['median_ms']:8.3f} {r['p95_ms']:8.3f} {r['n']:>5}")


def measure(source: Path | None = None) -> dict[str, list[Row]]:
    """The whole measurement in fresh namespaces (removed afterwards, also on errors); `source`
    is the src/ directory of the portsentry to measure (default: this working tree)."""
    from tests.system.rig import namespaces_up, ns_argv

    env = dict(os.environ)
    if source is not None:
        env[SOURCE_ENV] = str(source)
    with namespaces_up() as net:
        argv = ns_argv(net.target, [sys.executable, __file__, "--inner", net.scanner,
                                    net.target_ip4, str(netns_inode())])
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=DEADLINE + 60,
                              check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"bench/ban_backends.py --inner failed (exit {proc.returncode})")
    result: dict[str, list[Row]] = json.loads(proc.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", nargs=3, metavar=("SCANNER_NS", "TARGET_IP", "LAUNCHER_NETNS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print raw figures as JSON as well")
    args = parser.parse_args()
    if args.inner:
        inner(*args.inner)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/ban_backends.py: run as root (network namespaces)")
    try:
        out = measure()
    except RuntimeError as error:
        raise SystemExit(str(error)) from error
    print_tables(out)
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
