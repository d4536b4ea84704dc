"""Issue 12: bans shared through Redis, measured. Part `fleet` of bench/run.

Ten daemons in ten namespaces on one bridge (tests/system/fleetrig.py) and a redis-server in the
hub namespace. One thread of this process watches every host's nftables set through netlink
(NFNLGRP_NFTABLES, one socket made in each namespace) and stamps the moment each address is added.

- latency: `block ADDR` through host 1's control socket, one at a time; from the element in host
  1's set to the element in host N's set, N = 2..10 (the acceptance: p99 below 10 ms);
- burst: 1,000 `block` requests to host 1 from four threads at once; every host must get all
  1,000 (none lost), and how long the last one took;
- join: the other hosts stopped, 100,000 signed active bans put in the fleet's active set, an
  eleventh host started: how long until it holds them all (the acceptance: under 3 s).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import socket
import statistics
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address
from pathlib import Path

from tests.system.fleetrig import FleetNet, Host, Redis, add_host, fleet_config, fleet_net, make_key
from tests.system.teardown import Shield, run_tempdir

from bench import harness
from portsentry.fleet.decision import Decision, pack
from portsentry.fleet.link import Link
from portsentry.fleet.settings import FleetSettings
from portsentry.service import control

BEGIN = "<!-- bench:issue12:begin (written by bench/run --only fleet) -->"
END = "<!-- bench:issue12:end -->"
TITLE = "Fleet: bans shared through Redis (issue 12)"
HOSTS = 10
NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
NEWSETELEM = (10 << 8) | 12  # NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM
_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")


def _leaves(data: bytes, found: list[bytes], depth: int = 0) -> None:
    """Every 4-byte attribute payload inside nested netlink attributes (an IPv4 set key is one).
    nf_tables nests without NLA_F_NESTED, so any payload that reads as attributes is walked too;
    what else turns up is only compared with the wanted addresses."""
    offset = 0
    while offset + 4 <= len(data):
        length, _kind = _NLA.unpack_from(data, offset)
        if length < 4 or offset + length > len(data):
            return
        payload = data[offset + 4:offset + length]
        if len(payload) == 4:
            found.append(payload)
        elif len(payload) > 4 and depth < 6:
            _leaves(payload, found, depth + 1)
        offset += (length + 3) & ~3


class SetWatcher:
    """The first time each wanted address appears in each host's sets, on one thread."""

    def __init__(self, namespaces: Sequence[str]) -> None:
        self.seen: dict[str, dict[bytes, float]] = {ns: {} for ns in namespaces}
        self.wanted: set[bytes] = set()
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        for ns in namespaces:
            sock = harness.in_namespace(ns, self._socket)
            self._selector.register(sock, selectors.EVENT_READ, ns)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="set-watcher", daemon=True)
        self._thread.start()

    @staticmethod
    def _socket() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: bursts of thousands
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        return sock

    def want(self, addresses: Sequence[str]) -> None:
        with self._lock:
            self.wanted.update(socket.inet_aton(a) for a in addresses)

    def _run(self) -> None:
        while not self._stop:
            for key, _events in self._selector.select(timeout=0.2):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(1 << 20)
                except OSError:  # ENOBUFS: counted as missing, never as seen
                    continue
                at = time.time()
                self._parse(key.data, data, at)

    def _parse(self, ns: str, data: bytes, at: float) -> None:
        offset = 0
        while offset + _NLMSG.size <= len(data):
            length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
            if length < _NLMSG.size:
                return
            if kind == NEWSETELEM:
                found: list[bytes] = []
                _leaves(data[offset + _NLMSG.size + 4:offset + length], found)
                with self._lock:
                    seen = self.seen[ns]
                    for leaf in found:
                        if leaf in self.wanted and leaf not in seen:
                            seen[leaf] = at
            offset += (length + 3) & ~3

    def when(self, ns: str, address: str) -> float | None:
        with self._lock:
            return self.seen[ns].get(socket.inet_aton(address))

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()


def _block(host: Host, address: str) -> None:
    answer = control.request(host.daemon.config["CONTROL_SOCKET"],
                             {"command": "block", "address": address, "duration": 3600}, timeout=30)
    if not answer.get("ok"):
        raise harness.BenchError(f"block {address} on h{host.index}: {answer}")


def _wait(watcher: SetWatcher, hosts: Sequence[Host], addresses: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(watcher.when(h.ns, a) is not None for h in hosts for a in addresses):
            return
        time.sleep(0.002)


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure_latency(watcher: SetWatcher, hosts: Sequence[Host], count: int) -> dict[str, object]:
    first, samples, worst, missing = hosts[0], [], [], 0
    for i in range(count):
        address = f"198.19.250.{i % 250 + 1}" if i < 250 else f"198.19.251.{i % 250 + 1}"
        watcher.want([address])
        _block(first, address)
        _wait(watcher, hosts, [address], 3.0)
        start = watcher.when(first.ns, address)
        delays = [(t - start) * 1000 for h in hosts[1:] if start is not None
                  and (t := watcher.when(h.ns, address)) is not None]
        missing += len(hosts) - 1 - len(delays)
        samples += delays
        if delays:
            worst.append(max(delays))
        time.sleep(0.02)
    return {"count": count, "samples": len(samples), "missing": missing,
            "p50": statistics.median(samples), "p99": percentile(samples, 99), "max": max(samples),
            "worst_p50": statistics.median(worst), "worst_p99": percentile(worst, 99)}


def measure_burst(watcher: SetWatcher, hosts: Sequence[Host], count: int) -> dict[str, object]:
    addresses = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(count)]
    watcher.want(addresses)
    started = time.time()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda a: _block(hosts[0], a), addresses))
    requested = time.time() - started
    _wait(watcher, hosts, addresses, 60.0)
    arrived = {h.index: sum(watcher.when(h.ns, a) is not None for a in addresses) for h in hosts}
    last = max((t for h in hosts for a in addresses if (t := watcher.when(h.ns, a)) is not None),
               default=started)
    # Counted in the sets themselves too: the watcher could drop a netlink message, the kernel not.
    in_sets = {h.index: len(set(addresses) & h.blocked()) for h in hosts}
    return {"count": count, "requested_s": requested, "all_s": last - started, "arrived": arrived,
            "in_sets": in_sets}


def measure_join(net: FleetNet, redis: Redis, key: Path, workdir: Path, bans: int) -> dict[str, object]:
    settings = FleetSettings(redis.url, "test", "bench", key.read_bytes().rstrip(b"\n"), redis.password)
    now = time.time()

    def fill() -> None:
        link = Link(settings)
        for start in range(0, bans, 5000):
            pipe = link.client.pipeline(transaction=False)
            values, scores = {}, {}
            for i in range(start, min(start + 5000, bans)):
                # 198.18.128.0 onwards: inside 198.18.0.0/15, clear of the bridge's 198.18.100.0/24
                decision = Decision("bench", 1, i, "ban", IPv4Address(int(IPv4Address("198.18.128.0")) + i),
                                    now + 3600 + i / 1000, now, "bench")
                values[decision.address.compressed] = pack(decision, settings.key, settings.name)
                scores[decision.address.compressed] = decision.expires
            pipe.hset(link.bans_key, mapping=values)
            pipe.zadd(link.expiry_key, scores)
            pipe.execute()
        link.close()

    harness.in_namespace(net.hub, fill)
    ns = add_host(net, HOSTS + 1)
    watcher = SetWatcher([ns])
    wanted = [str(IPv4Address(int(IPv4Address("198.18.128.0")) + i)) for i in range(bans)]
    watcher.want(wanted)
    late = Host(net, ns, HOSTS + 1, workdir / "late",
                fleet_config(HOSTS + 1, redis, key, TCP_PORTS="1", KERNEL_BAN="off"), modes=("-tcp",))
    try:
        launched, wall = time.monotonic(), time.time()
        late.start()
        ready = time.monotonic() - launched
        record = late.syslog.wait_for("fleet: loaded the fleet's active set", timeout=120)
        loaded = time.monotonic() - launched
        _wait(watcher, [late], wanted, 30.0)
        seen = [t for a in wanted if (t := watcher.when(ns, a)) is not None]
        in_kernel = max(seen) - wall if len(seen) == len(wanted) else None
        held = len(set(wanted) & late.blocked())
        return {"bans": bans, "ready_s": ready, "loaded_s": loaded, "line": record.message, "held": held,
                "kernel_s": in_kernel}
    finally:
        watcher.close()
        late.close()


def measure(command: str, rev: str | None, load_at_start: str, latency_count: int = 200, burst: int = 1000,
            join: int = 100_000) -> str:
    work = run_tempdir("bench-fleet")
    hosts: list[Host] = []
    try:
        with fleet_net(HOSTS) as net, Redis(net.hub, work / "redis") as redis:
            key = make_key(work)
            for index, ns in enumerate(net.hosts, 1):
                host = Host(net, ns, index, work / f"h{index}",
                            fleet_config(index, redis, key, TCP_PORTS="1", KERNEL_BAN="off"), modes=("-tcp",))
                hosts.append(host)
                host.start()
            watcher = SetWatcher([h.ns for h in hosts])
            try:
                time.sleep(2)  # every fleet thread connected
                latency = measure_latency(watcher, hosts, latency_count)
                burst_result = measure_burst(watcher, hosts, burst)
            finally:
                watcher.close()
            for host in hosts:
                host.close()
            joined = measure_join(net, redis, key, work, join)
    finally:
        with Shield():
            for host in hosts:
                with contextlib.suppress(Exception):
                    host.close()
            shutil.rmtree(work, ignore_errors=True)
    return render(latency, burst_result, joined, command, rev, load_at_start)


def render(latency: dict[str, object], burst: dict[str, object], joined: dict[str, object], command: str,
           rev: str | None, load_at_start: str) -> str:
    count = int(str(burst["count"]))
    in_sets: dict[int, int] = burst["in_sets"]  # type: ignore[assignment]
    lost = {h: count - n for h, n in in_sets.items() if n != count}
    lines = [
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `{command}` (as root) on "
        f"{harness.describe_source(rev)}; load average at start {load_at_start}. {HOSTS} daemons (`-tcp`, "
        "nftables) in ten namespaces on one bridge, redis-server 7 (Debian) in an eleventh, all on this "
        "2-core machine; times from netlink events of each host's nftables set, read by one thread.",
        "",
        "| figure | result | acceptance |",
        "| --- | --- | --- |",
        f"| ban on host 1 to element in host N's set, N = 2..10 ({latency['count']} bans, "
        f"{latency['samples']} samples, {latency['missing']} missing) | p50 {latency['p50']:.2f} ms, "
        f"p99 {latency['p99']:.2f} ms, max {latency['max']:.2f} ms | p99 < 10 ms |",
        f"| the same, the last of the nine hosts per ban | p50 {latency['worst_p50']:.2f} ms, p99 "
        f"{latency['worst_p99']:.2f} ms | |",
        f"| burst: {burst['count']} bans requested on host 1 at once (in {burst['requested_s']:.2f} s) | "
        f"all {burst['count']} on all {HOSTS} hosts {burst['all_s']:.2f} s after the first request; lost: "
        f"{lost or 'none'} | none lost |",
        f"| a late host joins a fleet with {joined['bans']:,} active bans | all {joined['held']:,} in its "
        f"kernel set {_seconds(joined['kernel_s'])} after its start (READY at {joined['ready_s']:.2f} s), "
        f"all in its ban store at {joined['loaded_s']:.2f} s; its log: \"{joined['line']}\" | < 3 s |",
    ]
    return "\n".join(lines) + "\n"


def _seconds(value: object) -> str:
    return "(not all seen)" if value is None else f"{float(str(value)):.2f} s"


def write_block(doc: Path, block: str) -> None:
    harness.write_section(doc, TITLE, BEGIN, END, block)


if __name__ == "__main__":  # quick runs while developing: python -m bench.fleet_bench
    print(measure("python -m bench.fleet_bench", None, " ".join(f"{x:.2f}" for x in os.getloadavg()),
                  latency_count=int(os.environ.get("FLEET_BENCH_BANS", "50")),
                  burst=int(os.environ.get("FLEET_BENCH_BURST", "200")),
                  join=int(os.environ.get("FLEET_BENCH_JOIN", "10000"))))
