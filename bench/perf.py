"""Runs this PortSentry and Debian's PortSentry 1.2 against the same scans in fresh namespaces and
prints the figures side by side with ratios; also rewrites the results block of
docs/performance.md. Start it through bench/run (root needed)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gzip
import io
import json
import math
import os
import platform
import pstats
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tests.system import reaper, rig
from tests.system.teardown import RUN_ID, RUN_PREFIX, Shield, reaper_pid, run_tempdir

from bench import ban_backends, classic_path, fleet_bench, harness, kernel_path, many_bans, report_bench
from bench.harness import ALREADY, BLOCKED, DETECTION, KERNEL_SUMMARY, BenchError, Receiver, Running, Subject

DOC = harness.REPO_ROOT / "docs" / "performance.md"
BEGIN = "<!-- bench:results:begin (written by bench/run; edits inside are overwritten) -->"
END = "<!-- bench:results:end -->"

PARTS = ("scan", "latency", "flood", "spoof", "bans", "normal")
WATCHED_PORT = 79  # below ADVANCED_PORTS_TCP and not excluded: every probe to it is a hit
EXCLUDED = frozenset({113, 139})
FLOOD_SOURCE = "198.18.0.3"
BASE_IGNORE = ("127.0.0.1/32",)


# ---------------------------------------------------------------------------------------------
# One daemon in fresh namespaces


@dataclass
class Fixture:
    net: rig.Namespaces
    receiver: Receiver
    running: Running
    ready_mark: int
    workdir: Path
    runnings: list[Running]  # every daemon process (1.2 runs one per mode); running is the first


@contextlib.contextmanager
def fresh(subject: Subject, ignore: Sequence[str] = BASE_IGNORE,
          extra_scanner_addresses: Sequence[str] = (), modes: Sequence[str] = ("-atcp",),
          prepare: Callable[[rig.Namespaces], None] | None = None) -> Iterator[Fixture]:
    """New namespaces, receiver and daemon; all of it removed afterwards, also on errors.
    `prepare` runs in between, before the daemon starts (e.g. to open listeners)."""
    workdir = run_tempdir("bench")
    net = rig.create_namespaces(rig.new_prefix())
    receiver: Receiver | None = None
    runnings: list[Running] = []
    try:
        harness.add_addresses(net.scanner, "eth0", extra_scanner_addresses, 24)
        receiver = Receiver(workdir / "log", net.target)
        if prepare is not None:
            prepare(net)
        runnings = subject.start_modes(net, workdir, receiver, ignore, modes)
        yield Fixture(net, receiver, runnings[0], receiver.count(), workdir, runnings)
    finally:
        try:
            with Shield():
                for running in runnings:
                    subject.stop(running)
        finally:
            harness.remove_rig(net, receiver, workdir)


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class ScanResult:
    sent: int
    watched: int
    before_block: int
    detections: int
    distinct_ports: int
    already: int
    cpu: float
    first_to_block_ms: float
    start_to_first_ms: float
    scan_s: float
    catchup_s: float
    peak_rss_mib: float
    answered: int  # ports nmap saw answered (closed/open): replies that left before the block
    reached: int  # watched-port probes the target's input hook let through (not dropped by a block)
    counted: int = 0  # probes the kernel dropped, as ours' summary lines count them (kernel path)


NMAP_NOT_SHOWN = re.compile(r"(\d+) (closed|open) tcp ports")
NMAP_PORT_LINE = re.compile(r"^\d+/tcp\s+(closed|open)\b", re.MULTILINE)


def answered_ports(nmap_output: str) -> int:
    """Ports nmap reports closed or open: the target answered those probes, so they were sent
    before the blackhole route (which drops the replies) was in force."""
    return (sum(int(m[1]) for m in NMAP_NOT_SHOWN.finditer(nmap_output))
            + len(NMAP_PORT_LINE.findall(nmap_output)))


# Counts, in the target, the watched-port probes that got past the input hook's earlier chains
# (ours' nftables drop of blocked hosts is at priority -10, its NFLOG rules at -9): a probe counted
# here with no detection line was missed by the daemon, not dropped by its block. KILL_ROUTE
# blackholes only the replies, so there every probe is counted. Lives in the throwaway namespace.
REACHED_TABLE = """table inet psbench {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 1-1023 tcp dport != { 113, 139 } tcp flags & (syn | ack) == syn counter
    }
}
"""


def reached_count(ns: str) -> int:
    out = rig.run_in(ns, ["nft", "-j", "list", "chain", "inet", "psbench", "input"], check=True)
    for obj in json.loads(out.stdout)["nftables"]:
        for expr in obj.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise BenchError(f"no counter in the psbench chain:\n{out.stdout[:1000]}")


def measure_scan(subject: Subject, rate: int) -> ScanResult:
    with fresh(subject) as fx:
        pid = fx.running.pid
        rig.run_in(fx.net.target, ["nft", "-f", "-"], input_text=REACHED_TABLE, check=True)
        cpu0 = harness.cpu_seconds(pid)
        scan = harness.nmap_scan(fx.net.scanner, fx.net.target_ip4, rate)
        cpu1 = harness.settle(fx.receiver, pid)
        reached = reached_count(fx.net.target)
        if subject.name == harness.OursNative.name:
            # The kernel's counts of dropped probes are read every 5 s: wait for that round.
            with contextlib.suppress(BenchError):
                fx.receiver.wait_for(KERNEL_SUMMARY, 8.0, fx.ready_mark)
        rss = harness.peak_rss_kib(pid) / 1024
        entries = fx.receiver.entries(fx.ready_mark)
        detections = [e for e in entries if DETECTION.search(e.message)]
        blocks = [e for e in entries if BLOCKED.search(e.message)]
        if not detections or not blocks:
            raise BenchError(
                f"{subject.label}: nmap scan produced {len(detections)} detection and {len(blocks)} "
                f"block lines.\nOther lines:\n" + "\n".join(
                    e.message for e in entries if not (DETECTION.search(e.message)
                                                       or ALREADY.search(e.message)))
                + "\nFirst lines:\n" + "\n".join(e.message for e in entries[:6])
                + f"\nDaemon stderr:\n{harness.tail(fx.running.stderr_path)}"
                + "\nRoutes in the target:\n"
                + rig.run_in(fx.net.target, ["ip", "route", "show", "table", "all"]).stdout)
    block_at = blocks[0].at
    return ScanResult(
        sent=scan.sent,
        watched=sum(1 for p in range(1, 1024) if p not in EXCLUDED),
        before_block=sum(1 for e in detections if e.at < block_at),
        detections=len(detections),
        distinct_ports=len({m["port"] for e in detections if (m := DETECTION.search(e.message))}),
        already=sum(1 for e in entries if ALREADY.search(e.message) and not KERNEL_SUMMARY.search(e.message)),
        counted=sum(int(m["count"]) for e in entries if (m := KERNEL_SUMMARY.search(e.message))),
        cpu=cpu1 - cpu0,
        first_to_block_ms=(block_at - detections[0].at) * 1000,
        start_to_first_ms=(detections[0].at - scan.started) * 1000,
        scan_s=scan.finished - scan.started,
        catchup_s=max(0.0, entries[-1].at - scan.finished),
        peak_rss_mib=rss,
        answered=answered_ports(scan.output),
        reached=reached,
    )


@dataclass(frozen=True)
class LatencyResult:
    detect_ms: list[float]
    block_ms: list[float]
    missed: int
    started_ms: list[float] = field(default_factory=list)  # exec of /bin/sh (KILL_ROUTE) seen
    # Two SYNs from a fresh source 20 µs apart (bench/kernel_path.py): was each answered?
    first_answered: bool | None = None
    second_answered: bool | None = None


def measure_latency(subject: Subject, probes: int, run: int = 0) -> LatencyResult:
    if probes > 180:
        raise BenchError("at most 180 latency probes (one fresh source address each)")
    detect: list[float] = []
    block: list[float] = []
    started: list[float] = []
    missed = 0
    for probe in classic_path.run_probes(subject, probes, WATCHED_PORT, gap=0.05):
        if probe.blocked is None:
            missed += 1
            continue
        if probe.detected is None:
            raise BenchError(f"{probe.source} was blocked without a detection line")
        detect.append((probe.detected - probe.sent) * 1000)
        block.append((probe.blocked - probe.sent) * 1000)
        if probe.started is not None:
            started.append((probe.started - probe.sent) * 1000)
    first, second, _gap = kernel_path.two_syns(subject, f"198.18.0.{200 + run}")
    return LatencyResult(detect, block, missed, started, first, second)


@dataclass(frozen=True)
class FloodResult:
    sent: int
    seconds: float
    cpu: float
    lines: int

    @property
    def cpu_per_10k(self) -> float:
        return self.cpu / self.sent * 10_000 if self.sent else math.nan


def measure_flood(subject: Subject, ignored: bool, count: int, interval_us: int) -> FloodResult:
    ignore = (*BASE_IGNORE, f"{FLOOD_SOURCE}/32") if ignored else BASE_IGNORE
    with fresh(subject, ignore=ignore, extra_scanner_addresses=[FLOOD_SOURCE]) as fx:
        pid = fx.running.pid
        cpu0 = harness.cpu_seconds(pid)
        flood = harness.hping_flood(fx.net.scanner, fx.net.target_ip4, FLOOD_SOURCE, WATCHED_PORT,
                                    count, interval_us, timeout=max(30.0, count * interval_us / 1e6 * 5))
        cpu1 = harness.settle(fx.receiver, pid)
        lines = len(fx.receiver.entries(fx.ready_mark))
    return FloodResult(flood.sent, flood.finished - flood.started, cpu1 - cpu0, lines)


@dataclass(frozen=True)
class SpoofPoint:
    """The daemon after `sources` spoofed SYNs, once it had caught up with them."""

    sources: int
    rss_mib: float
    seen: int  # probes the daemon reported: ours' status probes_seen, 1.2's detection lines
    blocks: int  # block lines so far
    cpu: float  # daemon CPU since the flood started


@dataclass(frozen=True)
class SpoofResult:
    family: int
    pps: float
    send_s: float
    points: list[SpoofPoint]
    peak_rss_mib: float

    @property
    def first(self) -> SpoofPoint:
        return self.points[0]

    @property
    def last(self) -> SpoofPoint:
        return self.points[-1]


SPOOF_SENDER = Path(__file__).with_name("spoofsend.py")
SPOOF_IPV4_SOURCES = 131_072 - 512  # 198.18.0.0/15 without the rig's 198.18.0.0/23


def measure_spoof(subject: Subject, family: int, count: int, checkpoint: int, pps: float) -> SpoofResult:
    """One SYN to the watched port from each of `count` distinct forged sources (bench/spoofsend.py
    in the scanner namespace, AF_PACKET, paced at `pps`), with a pause after `checkpoint` of them:
    at the pause and at the end, once the daemon is idle again, its RSS and what it saw."""
    if not 0 < checkpoint < count:
        raise BenchError(f"spoof checkpoint {checkpoint} must be between 0 and {count}")
    with fresh(subject) as fx:
        pid = fx.running.pid
        # Namespaced: a forged source has no route back, and 1.2's raw socket only sees what
        # the routing input step accepts (0 is a new namespace's default; made explicit).
        for key in ("all", "default", "eth0"):
            rig.run_in(fx.net.target, ["sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0"], check=True)
        link = rig.run_in(fx.net.target, ["ip", "-j", "link", "show", "dev", "eth0"], check=True)
        target_mac = str(json.loads(link.stdout)[0]["address"])
        destination = fx.net.target_ip6 if family == 6 else fx.net.target_ip4
        max_seconds = count / pps * 2 + 30
        argv = [sys.executable, str(SPOOF_SENDER), "--family", str(family), "--dst", destination,
                "--dst-mac", target_mac, "--port", str(WATCHED_PORT), "--count", str(count),
                "--pps", str(pps), "--checkpoint", str(checkpoint),
                "--max-seconds", str(max_seconds)]
        sender = subprocess.Popen(rig.ns_argv(fx.net.scanner, argv), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        deadline = time.monotonic() + max_seconds + 300
        points: list[SpoofPoint] = []

        def line() -> str:
            assert sender.stdout is not None
            ready, _, _ = select.select([sender.stdout], [], [], max(0.0, deadline - time.monotonic()))
            text = sender.stdout.readline() if ready else ""
            if not text:
                assert sender.stderr is not None
                sender.kill()
                raise BenchError(f"spoofsend stopped or timed out (exit {sender.wait(5)}): "
                                 f"{sender.stderr.read()[-2000:]}")
            return text.strip()

        def point(sources: int, cpu0: float) -> SpoofPoint:
            cpu = harness.settle(fx.receiver, pid, timeout=180.0)
            entries = fx.receiver.entries(fx.ready_mark)
            detections = sum(1 for e in entries if DETECTION.search(e.message))
            blocks = sum(1 for e in entries if BLOCKED.search(e.message))
            if isinstance(subject, harness.Ours):
                seen = harness.daemon_status(harness.control_socket(fx.workdir))["probes_seen"]
                assert isinstance(seen, int)
            else:
                seen = detections
            return SpoofPoint(sources, harness.rss_kib(pid) / 1024, seen, blocks, cpu - cpu0)

        try:
            if line() != "ready":
                raise BenchError("spoofsend did not start")
            cpu0 = harness.cpu_seconds(pid)
            while True:
                words = line().split()
                if words[0] == "checkpoint":
                    points.append(point(int(words[1]), cpu0))
                    assert sender.stdin is not None
                    sender.stdin.write("go\n")
                    sender.stdin.flush()
                elif words[0] == "done":
                    sent, send_s = int(words[1]), float(words[2])
                    break
                else:
                    raise BenchError(f"spoofsend said {' '.join(words)!r}")
            sender.wait(10)
            points.append(point(sent, cpu0))
            peak = harness.peak_rss_kib(pid) / 1024
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait(5)
            for stream in (sender.stdin, sender.stdout, sender.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
    return SpoofResult(family, pps, send_s, points, peak)


NORMAL_SCRIPT = Path(__file__).with_name("normal_traffic.py")
NORMAL_TCP_PORT = 80  # watched range (below 1024), but with a real listener: not a probe
NORMAL_UDP_PORT = 514  # likewise; a one-way stream, as syslog is, so conntrack never sees a reply


@dataclass(frozen=True)
class NormalResult:
    seconds: float  # the window: sender start to sender exit
    cpu: float  # daemon CPU (all its processes) over the window
    cpu_until_idle: float  # the same, until the daemon had caught up
    tcp_bytes: int  # received by the sink
    udp_sent: int
    udp_received: int
    rx_packets: int  # target eth0, as the kernel counts them (a GRO/GSO aggregate counts once)
    alerts: int  # attackalert lines during the run (should be 0: all of it is normal traffic)

    @property
    def core_percent(self) -> float:
        return self.cpu / self.seconds * 100


def measure_normal(subject: Subject, seconds: float, udp_pps: float) -> NormalResult:
    """A bulk TCP transfer and a paced UDP stream, both to ports with real listeners (opened before
    the daemon starts), for `seconds`; the daemon watches -atcp and -audp (1.2: one process each)."""
    sinks: list[subprocess.Popen[str]] = []

    def prepare(net: rig.Namespaces) -> None:
        argv = [sys.executable, str(NORMAL_SCRIPT), "sink", "--tcp-port", str(NORMAL_TCP_PORT),
                "--udp-port", str(NORMAL_UDP_PORT), "--max-seconds", str(seconds + 180)]
        sink = subprocess.Popen(rig.ns_argv(net.target, argv), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        sinks.append(sink)
        assert sink.stdout is not None
        ready, _, _ = select.select([sink.stdout], [], [], 15.0)
        if not ready or sink.stdout.readline().strip() != "ready":
            raise BenchError("normal_traffic.py sink did not start")

    try:
        with fresh(subject, modes=("-atcp", "-audp"), prepare=prepare) as fx:
            pids = [r.pid for r in fx.runnings]
            rx0, _ = harness.link_counters(fx.net.target, "eth0")
            cpu0 = sum(harness.cpu_seconds(pid) for pid in pids)
            started = time.time()
            sent = rig.run_in(fx.net.scanner, [
                sys.executable, str(NORMAL_SCRIPT), "send", "--dst", fx.net.target_ip4,
                "--tcp-port", str(NORMAL_TCP_PORT), "--udp-port", str(NORMAL_UDP_PORT),
                "--seconds", str(seconds), "--udp-pps", str(udp_pps)], timeout=seconds + 60, check=True)
            cpu1 = sum(harness.cpu_seconds(pid) for pid in pids)
            window = time.time() - started
            rx1, _ = harness.link_counters(fx.net.target, "eth0")
            cpu2 = sum(harness.settle(fx.receiver, pid) for pid in pids)
            sink = sinks[0]
            assert sink.stdin is not None and sink.stdout is not None
            sink.stdin.close()
            ready, _, _ = select.select([sink.stdout], [], [], 10.0)
            received = json.loads(sink.stdout.readline() if ready else "{}")
            if "tcp_bytes" not in received:
                raise BenchError("normal_traffic.py sink gave no counts")
            alerts = sum(1 for e in fx.receiver.entries(fx.ready_mark) if "attackalert" in e.message)
    finally:
        for sink in sinks:
            if sink.poll() is None:
                sink.kill()
            sink.wait(5)
            for stream in (sink.stdin, sink.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
    sender = json.loads(sent.stdout.strip().splitlines()[-1])
    return NormalResult(window, cpu1 - cpu0, cpu2 - cpu0, int(received["tcp_bytes"]),
                        int(sender["udp_datagrams"]), int(received["udp_datagrams"]), rx1 - rx0, alerts)


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass
class Row:
    """One line of the results table: a figure for each daemon, over the repetitions."""

    label: str
    unit: str
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    decimals: int = 0
    native: list[float] = field(default_factory=list)  # ours with BAN_BACKEND="nftables"

    def cell(self, values: list[float]) -> str:
        if not values:
            return "-"
        med = statistics.median(values)
        text = f"{med:.{self.decimals}f}"
        if len(values) > 1 and min(values) != max(values):
            text += f" ({min(values):.{self.decimals}f}-{max(values):.{self.decimals}f})"
        return text

    def ratio(self, which: str = "ours") -> str:
        """Median of `which` ("ours" or "native") over 1.2's median."""
        values = self.native if which == "native" else self.ours
        if not values or not self.theirs:
            return "-"
        a, b = statistics.median(values), statistics.median(self.theirs)
        if b == 0:
            return "-" if a == 0 else "inf"
        # Two significant digits for small ratios (0.0007 rather than 0.00).
        return f"{a / b:.2f}" if abs(a / b) >= 0.1 else f"{a / b:.2g}"


@dataclass
class Section:
    title: str
    how: str
    rows: list[Row]
    notes: str = ""  # markdown shown after the table (also in the text output)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 30 samples p99 is the slowest one)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def scan_section(results: dict[str, list[ScanResult]], rate: int) -> Section:
    def row(label: str, unit: str, get: Callable[[ScanResult], float], decimals: int = 0) -> Row:
        return Row(label, unit, [get(r) for r in results["ours"]], [get(r) for r in results["1.2"]],
                   decimals, [get(r) for r in results.get("ours-nft", [])])

    return Section(
        f"Full SYN scan, nmap --min-rate {rate}, -atcp",
        f"`nmap -sS -p- --min-rate {rate} -n -Pn --max-retries 0 198.18.0.1` from the scanner "
        f"namespace; reproduce with `bench/run --only scan --rates {rate}`",
        [
            row("probes nmap sent", "packets", lambda r: r.sent),
            row("probes to watched ports (1-1023 minus 113,139)", "packets", lambda r: r.watched),
            row("watched-port probes that reached the target (not dropped by a block)", "probes",
                lambda r: r.reached),
            row("watched-port probes missed (reached the target, no detection line)", "probes",
                lambda r: max(0, r.reached - r.distinct_ports)),
            row("probes answered before the block took effect (ports nmap saw closed)", "probes",
                lambda r: r.answered),
            row("detection lines before the block line", "lines", lambda r: r.before_block),
            row("detection lines in total", "lines", lambda r: r.detections),
            row("distinct ports in detection lines", "ports", lambda r: r.distinct_ports),
            row("already-blocked lines", "lines", lambda r: r.already),
            row("watched-port probes counted in summary lines (the kernel dropped them)", "probes",
                lambda r: r.counted),
            row("watched-port probes neither logged nor counted", "probes",
                lambda r: max(0, r.watched - r.detections - r.counted)),
            row("daemon CPU, scan start until idle (incl. children)", "s", lambda r: r.cpu, 2),
            row("first detection line -> block in force (block line)", "ms",
                lambda r: r.first_to_block_ms, 1),
            row("nmap launched -> first detection line", "ms", lambda r: r.start_to_first_ms, 1),
            row("nmap launched -> block in force (block line)", "ms",
                lambda r: r.start_to_first_ms + r.first_to_block_ms, 1),
            row("nmap run time", "s", lambda r: r.scan_s, 2),
            row("last line arrived after nmap ended", "s", lambda r: r.catchup_s, 2),
            row("peak RSS (VmHWM)", "MiB", lambda r: r.peak_rss_mib, 1),
        ],
    )


def latency_section(results: dict[str, list[LatencyResult]], probes: int) -> Section:
    def pooled(name: str, get: Callable[[LatencyResult], list[float]]) -> list[float]:
        return [v for r in results.get(name, []) for v in get(r)]

    def row(label: str, get: Callable[[LatencyResult], list[float]], q: float) -> Row:
        ours, theirs, native = pooled("ours", get), pooled("1.2", get), pooled("ours-nft", get)
        return Row(label, "ms", [percentile(ours, q)] if ours else [],
                   [percentile(theirs, q)] if theirs else [], 2,
                   [percentile(native, q)] if native else [])

    def answered(label: str, get: Callable[[LatencyResult], bool | None]) -> Row:
        def runs(name: str) -> list[float]:
            seen = [get(r) for r in results.get(name, []) if get(r) is not None]
            return [float(sum(1 for v in seen if v))] if seen else []
        return Row(f"{label}, runs of {len(results.get('ours', []))}", "runs", runs("ours"), runs("1.2"),
                   0, runs("ours-nft"))

    return Section(
        f"First probe to block, {probes} single SYNs from fresh addresses",
        f"one SYN to port {WATCHED_PORT} from each of 198.18.0.10-198.18.0.{9 + probes} (bench/synsend.py, "
        "raw socket, send time taken just before sendto); time until the receiver got the line; "
        f"reproduce with `bench/run --only latency --latency-probes {probes}`",
        [
            row("probe sent -> detection line, median", lambda r: r.detect_ms, 50),
            row("probe sent -> detection line, p99", lambda r: r.detect_ms, 99),
            row("probe sent -> KILL_ROUTE started (exec of /bin/sh), median", lambda r: r.started_ms, 50),
            row("probe sent -> KILL_ROUTE started (exec of /bin/sh), p99", lambda r: r.started_ms, 99),
            row("probe sent -> block in force (block line), median", lambda r: r.block_ms, 50),
            row("probe sent -> block in force (block line), p99", lambda r: r.block_ms, 99),
            Row("probes with no block line within 10 s", "probes",
                [float(sum(r.missed for r in results["ours"]))],
                [float(sum(r.missed for r in results["1.2"]))], 0,
                [float(sum(r.missed for r in results.get("ours-nft", [])))]),
            answered("first of two SYNs from a fresh source answered", lambda r: r.first_answered),
            answered("second SYN, sent 20 µs after the first, answered (0: dropped)",
                     lambda r: r.second_answered),
        ],
        "KILL_ROUTE started: the kernel's stamp of the first exec in a child of the daemon after "
        "the send (bench/procevents.py, the process events connector), i.e. `/bin/sh -c "
        "KILL_ROUTE` starting; both daemons run the same command, and neither is changed to be "
        "seen. The kernel column has no KILL_ROUTE. The two-SYN rows: once per run, against "
        "another fresh daemon, two SYNs to port 79 from a fresh source, the second after a "
        "20 µs busy wait (bench/kernel_path.py); the cell counts the runs in which an answer "
        "(SYN-ACK or RST) came back.",
    )


def flood_section(results: dict[tuple[str, bool], list[FloodResult]], count: int,
                  interval_us: int) -> Section:
    rows: list[Row] = []
    for ignored in (False, True):
        who = "ignored source" if ignored else "blocked source"

        def row(label: str, unit: str, get: Callable[[FloodResult], float], decimals: int = 0,
                ignored: bool = ignored) -> Row:
            return Row(label, unit, [get(r) for r in results[("ours", ignored)]],
                       [get(r) for r in results[("1.2", ignored)]], decimals,
                       [get(r) for r in results.get(("ours-nft", ignored), [])])

        rows += [
            row(f"{who}: SYNs hping3 sent", "packets", lambda r: r.sent),
            row(f"{who}: daemon CPU, flood start until idle", "s", lambda r: r.cpu, 2),
            row(f"{who}: CPU per 10k probes", "s", lambda r: r.cpu_per_10k, 3),
            row(f"{who}: syslog lines", "lines", lambda r: r.lines),
        ]
    return Section(
        f"CPU per 10k probes, hping3 SYN flood to watched port {WATCHED_PORT}",
        f"`hping3 -q -S -p {WATCHED_PORT} -a {FLOOD_SOURCE} -i u{interval_us} -c {count} 198.18.0.1`, "
        f"source listed in the ignore file or not; reproduce with `bench/run --only flood "
        f"--flood-count {count} --flood-interval-us {interval_us}`",
        rows,
    )


def normal_section(results: dict[str, list[NormalResult]], seconds: float, udp_pps: float) -> Section:
    def row(label: str, unit: str, get: Callable[[NormalResult], float], decimals: int = 0) -> Row:
        return Row(label, unit, [get(r) for r in results["ours"]], [get(r) for r in results["1.2"]],
                   decimals, [get(r) for r in results.get("ours-nft", [])])

    return Section(
        "Normal traffic: daemon CPU under a bulk TCP transfer and a UDP stream",
        f"bench/normal_traffic.py: one TCP connection from the scanner streaming as fast as it can "
        f"to a listener on port {NORMAL_TCP_PORT} in the target, and {udp_pps:.0f} UDP datagrams/s "
        f"of 512 bytes to a listener on port {NORMAL_UDP_PORT}, for {seconds:.0f} s; both ports are "
        f"in the watched range (below 1024) but have listeners, opened before the daemon starts. "
        f"The daemon watches -atcp and -audp: ours in one process, 1.2 in one process per mode "
        f"(CPU summed). CPU is utime+stime from /proc/PID/stat over the window; reproduce with "
        f"`bench/run --only normal --normal-seconds {seconds:.0f} --normal-udp-pps {udp_pps:.0f}`",
        [
            row("daemon CPU over the window, % of one core (goal < 1%)", "%", lambda r: r.core_percent, 2),
            row("daemon CPU over the window", "s", lambda r: r.cpu, 2),
            row("daemon CPU, window start until idle", "s", lambda r: r.cpu_until_idle, 2),
            row("window (sender start to exit)", "s", lambda r: r.seconds, 1),
            row("TCP bytes received by the listener", "MB", lambda r: r.tcp_bytes / 1e6, 0),
            row("TCP throughput", "MB/s", lambda r: r.tcp_bytes / 1e6 / r.seconds, 0),
            row("UDP datagrams sent", "datagrams", lambda r: r.udp_sent),
            row("UDP datagrams received by the listener", "datagrams", lambda r: r.udp_received),
            row("packets received on the target's eth0 (GRO aggregates count once)", "packets",
                lambda r: r.rx_packets),
            row("attackalert lines (all of it is normal traffic)", "lines", lambda r: r.alerts),
        ],
    )


def spoof_section(results: dict[tuple[str, int], list[SpoofResult]], counts: dict[int, int],
                  checkpoint: int, pps: float) -> Section:
    rows: list[Row] = []
    for family in (6, 4):
        if not results.get(("ours", family)) and not results.get(("1.2", family)):
            continue
        who = ("IPv6 fd00::/8" if family == 6 else "IPv4 198.18.0.0/15") + f", {counts[family]} sources"

        def row(label: str, unit: str, get: Callable[[SpoofResult], float], decimals: int = 0,
                family: int = family, who: str = who) -> Row:
            return Row(f"{who}: {label}", unit, [get(r) for r in results.get(("ours", family), [])],
                       [get(r) for r in results.get(("1.2", family), [])], decimals)

        def growth(r: SpoofResult) -> float:
            extra = r.last.sources - r.first.sources
            return (r.last.rss_mib - r.first.rss_mib) / extra * 100_000 if extra else math.nan

        rows += [
            row("SYNs sent", "packets", lambda r: r.last.sources),
            row("send rate", "pps", lambda r: r.last.sources / r.send_s if r.send_s else math.nan),
            row("probes the daemon saw", "probes", lambda r: r.last.seen),
            row(f"RSS after {checkpoint} sources", "MiB", lambda r: r.first.rss_mib, 1),
            row("RSS after all sources", "MiB", lambda r: r.last.rss_mib, 1),
            row(f"RSS after all / after {checkpoint} (goal: at most 1.10)", "ratio",
                lambda r: r.last.rss_mib / r.first.rss_mib, 2),
            row("RSS growth per 100k further sources", "MiB", growth, 2),
            row("peak RSS (VmHWM)", "MiB", lambda r: r.peak_rss_mib, 1),
            row("hosts blocked (block lines)", "hosts", lambda r: r.last.blocks),
            row("daemon CPU, flood start until idle", "s", lambda r: r.last.cpu, 2),
            row("daemon CPU per 10k sources", "s", lambda r: r.last.cpu / r.last.sources * 10_000, 3),
        ]
    curves = []
    for (name, family), runs in sorted(results.items()):
        for r in runs:
            readings = ", ".join(f"{p.sources // 1000}k: {p.rss_mib:.1f}" for p in r.points[:-1])
            curves.append(f"- {'ours' if name == 'ours' else name}, IPv{family}: {readings}, "
                          f"end: {r.last.rss_mib:.1f} MiB")
    return Section(
        "Spoofed SYN flood, one SYN from each of many random sources",
        f"bench/spoofsend.py in the scanner namespace writes Ethernet frames to an AF_PACKET socket at "
        f"{pps:.0f} pps, one SYN to port {WATCHED_PORT} from each forged source; it pauses after "
        f"every {checkpoint} sources until the daemon is idle, for a reading. 1.2 has no IPv6, so "
        f"only ours gets the IPv6 flood; both get the IPv4 one, over all of 198.18.0.0/15 but the "
        f"rig's 198.18.0.0/23. Ours runs with its default BAN_RATE_LIMIT (60 new bans a minute), "
        f"1.2 blocks every source it sees. Reproduce with `bench/run --only spoof "
        f"--spoof-sources {counts[6]} --spoof-pps {pps:.0f}`",
        rows,
        "\"Probes the daemon saw\": ours' `probes_seen` from its control socket `status`, 1.2's "
        "detection lines. RSS is VmRSS of the daemon process, read once the daemon is idle. "
        "RSS (MiB) after each pause, by sources sent:\n\n" + "\n".join(curves),
    )


def bans_section(out: dict[str, list[dict[str, object]]]) -> Section:
    """From bench/ban_backends.py's figures: ours' backends at 100k active against 1.2's
    KILL_ROUTE commands, restores, the packet path; all sizes go in the notes."""
    def single(backend: str, active: int) -> dict[str, object] | None:
        for r in out["single"]:
            if r["backend"] == backend and r["active"] == active:
                return r
        return None

    def ms(backend: str, op: str, active: int = 100_000, key: str = "median_ms") -> list[float]:
        r = single(backend, active)
        if r is None:
            return []
        figures = r[op]
        assert isinstance(figures, dict)
        return [float(figures[key])]

    def restore(name: str) -> list[float]:
        return [float(str(r["setup_and_restore_s"])) for r in out["restore"] if r["backend"] == name]

    def path(prefix: str) -> list[float]:
        return [float(str(r["median_ms"])) for r in out["path"] if str(r["setup"]).startswith(prefix)]

    ipt, route = "1.2 KILL_ROUTE iptables", "1.2 KILL_ROUTE ip route"
    rows: list[Row] = []
    for label, ours_backend, theirs in (
        ("nftables netlink (default) vs 1.2 iptables -I", "nft netlink (chosen)", ipt),
        ("ipset vs 1.2 iptables -I", "ipset (process per ban)", ipt),
        ("route vs 1.2 ip route add blackhole", "route (process per ban)", route),
        ("nft -f - (fallback) vs 1.2 iptables -I", "nft -f - (fallback)", ipt),
    ):
        undo = label.replace(" -I", " -D").replace("route add", "route del")
        rows.append(Row(f"add one ban, 100k active, median: {label}", "ms", ms(ours_backend, "add"),
                        ms(theirs, "add"), 3))
        rows.append(Row(f"remove one ban, 100k active, median: {undo}", "ms",
                        ms(ours_backend, "remove"), ms(theirs, "remove"), 3))
    rows.append(Row("add one ban, 100k active, p95: nftables netlink vs 1.2 iptables -I", "ms",
                    ms("nft netlink (chosen)", "add", key="p95_ms"), ms(ipt, "add", key="p95_ms"), 3))
    rows.append(Row("remove one ban, 100k active, p95: nftables netlink vs 1.2 iptables -D", "ms",
                    ms("nft netlink (chosen)", "remove", key="p95_ms"), ms(ipt, "remove", key="p95_ms"), 3))
    for daemon in out.get("daemon", []):
        rows.append(Row("restore 100k bans at start: store read + nftables (goal < 2 s)", "s",
                        [float(str(daemon["restore_s"]))], [], 2))
        write = daemon["store_write"]
        assert isinstance(write, dict)
        rows.append(Row("ban store write per ban, 0-100k stored, median", "ms",
                        [float(write["median_ms"])], [], 3))
    rows += [
        Row("restore 100k bans: nftables netlink add_many", "s", restore("nft netlink"), [], 2),
        Row("restore 100k bans: ipset restore", "s", restore("ipset restore"), [], 2),
        Row("restore 100k bans: route ip -batch", "s", restore("route ip -batch"), [], 2),
        Row("restore 100k bans: nft -f - (fallback)", "s", restore("nft -f -"), [], 2),
        Row("TCP connect from an unbanned host, 100k bans: nft set vs 1.2's 100k iptables rules",
            "ms", path("nft set"), path("iptables"), 3),
    ]
    detail = ["| mechanism | active | add median | add p95 | remove median | remove p95 | samples | fill |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in out["single"]:
        add, rem = r["add"], r["remove"]
        assert isinstance(add, dict) and isinstance(rem, dict)
        detail.append(f"| {r['backend']} | {r['active']} | {add['median_ms']:.3f} ms "
                      f"| {add['p95_ms']:.3f} ms | {rem['median_ms']:.3f} ms | {rem['p95_ms']:.3f} ms "
                      f"| {add['n']} "
                      f"| {float(str(r['fill_s'])):.2f} s |")
    return Section(
        "Bans: add, remove and restore with 100k active",
        "bench/ban_backends.py in a fresh target namespace (add/remove of one address with 100k "
        "others banned; 1.2's KILL_ROUTE commands run through `sh -c` as its system() does; 1.2 "
        "never removes a ban or restores one, so its remove figure is the matching delete an admin "
        "would run and it has no restore figure); reproduce with `bench/run --only bans` "
        "(or `python bench/ban_backends.py`)",
        rows,
        "All sizes (fill: time to put the other bans in place in bulk):\n\n" + "\n".join(detail),
    )


def capture_section() -> Section:
    """Rerun bench/capture_mechanisms.py (about 6 minutes) and show its report as the notes."""
    argv = [sys.executable, str(Path(__file__).with_name("capture_mechanisms.py"))]
    print("capture mechanisms: bench/capture_mechanisms.py (about 6 minutes) ...", file=sys.stderr,
          flush=True)
    proc = subprocess.run(argv, cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=1200,
                          check=False)
    if proc.returncode != 0:
        raise BenchError(f"capture_mechanisms.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return Section(
        "Capture mechanisms (rerun)",
        "bench/capture_mechanisms.py, ours only (which kernel interface feeds the stealth sensor); "
        "reproduce with `bench/run --only capture`; the method and the decision are in "
        "[capture.md](capture.md)",
        [],
        "```\n" + proc.stdout.strip() + "\n```",
    )


# (section title starts with, row label contains all of, label in the summary)
SUMMARY: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Full SYN scan, nmap --min-rate 50000", ("watched-port probes missed",),
     "scan 50000/s: watched-port probes missed (goal 0)"),
    ("Full SYN scan, nmap --min-rate 50000", ("probes answered before",),
     "scan 50000/s: probes answered before the block took effect"),
    ("Full SYN scan, nmap --min-rate 50000", ("first detection line -> block",),
     "scan 50000/s: first detection -> block in force"),
    ("Full SYN scan, nmap --min-rate 50000", ("daemon CPU",), "scan 50000/s: daemon CPU"),
    ("Full SYN scan, nmap --min-rate 20000", ("watched-port probes missed",),
     "scan 20000/s: watched-port probes missed (goal 0)"),
    ("Full SYN scan, nmap --min-rate 20000", ("probes answered before",),
     "scan 20000/s: probes answered before the block took effect"),
    ("Full SYN scan, nmap --min-rate 20000", ("first detection line -> block",),
     "scan 20000/s: first detection -> block in force"),
    ("Full SYN scan, nmap --min-rate 20000", ("daemon CPU",), "scan 20000/s: daemon CPU"),
    ("First probe to block", ("detection line", "median"),
     "first probe -> detection line, median (goal <= 1.0x 1.2)"),
    ("First probe to block", ("KILL_ROUTE started", "median"),
     "first probe -> KILL_ROUTE started, median (goal <= 1.0x 1.2)"),
    ("First probe to block", ("second SYN",), "second SYN 20 µs after the first answered (goal: 0 runs)"),
    ("First probe to block", ("block in force", "median"),
     "first probe -> block in force, median (goal < 1 ms with a native block)"),
    ("First probe to block", ("block in force", "p99"), "first probe -> block in force, p99"),
    ("CPU per 10k probes", ("blocked source: CPU per 10k",), "CPU per 10k probes, blocked source"),
    ("CPU per 10k probes", ("ignored source: CPU per 10k",), "CPU per 10k probes, ignored source"),
    # The first "RSS after" row is the first pause (--spoof-checkpoint sources, 100k by default).
    ("Spoofed SYN flood", ("IPv6", "RSS after"), "spoofed IPv6 flood: RSS after the first pause"),
    ("Spoofed SYN flood", ("IPv6", "RSS after all sources"), "spoofed IPv6 flood: RSS after all sources"),
    ("Spoofed SYN flood", ("IPv6", "RSS after all /"),
     "spoofed IPv6 flood: RSS after all / after the first pause (goal <= 1.10)"),
    ("Spoofed SYN flood", ("IPv4", "RSS after all /"),
     "spoofed IPv4 flood: RSS after all / after the first pause"),
    ("Spoofed SYN flood", ("IPv4", "probes the daemon saw"), "spoofed IPv4 flood: probes the daemon saw"),
    ("Normal traffic", ("% of one core",),
     "normal traffic (bulk TCP + UDP stream): daemon CPU, % of one core (goal < 1%)"),
    ("Bans", ("add one ban", "median: nftables"),
     "add one ban, 100k active: nftables vs iptables (goal < 1 ms)"),
    ("Bans", ("remove one ban", "median: nftables"),
     "remove one ban, 100k active: nftables vs iptables (goal < 1 ms)"),
    ("Bans", ("restore 100k bans at start",), "restore 100k bans at start (goal < 2 s)"),
)


def summary_section(sections: list[Section]) -> Section | None:
    """The key rows of the other sections in one table (same values, shorter labels)."""
    rows: list[Row] = []
    for title, needles, label in SUMMARY:
        for sec in sections:
            if not sec.title.startswith(title):
                continue
            found = next((r for r in sec.rows if all(n in r.label for n in needles)), None)
            if found is not None:
                rows.append(dataclasses.replace(found, label=label))
    if not rows:
        return None
    return Section("Summary", "key rows of the sections below, which say how each is measured and "
                   "reproduced; ours/1.2 is the ratio of the medians; the bans rows compare "
                   "mechanisms, not daemons, so their \"ours\" is the nftables backend", rows)


def has_native(sec: Section) -> bool:
    return any(r.native for r in sec.rows)


def columns(sec: Section, r: Row) -> list[str]:
    """The value cells of `r`: ours, [ours (kernel),] 1.2, ours/1.2[, kernel/1.2]."""
    if has_native(sec):
        return [r.cell(r.ours), r.cell(r.native), r.cell(r.theirs), r.ratio(), r.ratio("native")]
    return [r.cell(r.ours), r.cell(r.theirs), r.ratio()]


def headings(sec: Section) -> list[str]:
    if has_native(sec):
        return ["ours", "ours (kernel)", "1.2", "ours/1.2", "kernel/1.2"]
    return ["ours", "1.2", "ours/1.2"]


def _text_line(first: str, values: list[str], width: int, widths: list[int]) -> str:
    cells = "  ".join(f"{v:>{w}}" for v, w in zip(values, widths, strict=True))
    return f"   {first:<{width}}  {cells}"


def render_text(sections: list[Section]) -> str:
    out: list[str] = []
    for sec in sections:
        out.append(f"\n== {sec.title}\n   {sec.how}")
        if not sec.rows:
            out.append("   " + sec.notes.replace("\n", "\n   "))
            continue
        width = max(len(f"{r.label} [{r.unit}]") for r in sec.rows)
        heads = headings(sec)
        cols = [columns(sec, r) for r in sec.rows]
        widths = [max(len(h), *(len(c[i]) for c in cols)) for i, h in enumerate(heads)]
        out.append(_text_line("figure", heads, width, widths))
        out.extend(_text_line(f"{r.label} [{r.unit}]", c, width, widths)
                   for r, c in zip(sec.rows, cols, strict=True))
        if sec.notes:
            out.append("   " + sec.notes.replace("\n", "\n   "))
    return "\n".join(out) + "\n"


def render_markdown(sections: list[Section], info: dict[str, str], repeat: int) -> str:
    lines = [
        f"Run on {info['date']} by `{info['command']}`.",
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in info.items() if k not in ("date", "command")),
        "",
        f"Cells are the median of {repeat} runs, each in fresh namespaces, with the range in "
        "brackets when the runs differ; the latency section pools all probes. Ratios are "
        "ours / 1.2 of the medians. \"ours\" is configured like 1.2 (KILL_ROUTE \"ip route add "
        "blackhole\"); \"ours (kernel)\", where shown, is ours with BAN_BACKEND=\"nftables\", "
        "KERNEL_BAN at its default (auto) and no KILL_ROUTE: the first probe bans its source in the "
        "kernel, and its capture is NFLOG.",
    ]
    for sec in sections:
        lines += ["", f"### {sec.title}", "", sec.how + "."]
        if sec.rows:
            heads = headings(sec)
            lines += ["", "| figure | unit | " + " | ".join(heads) + " |",
                      "| --- | --- | " + " | ".join("---:" for _ in heads) + " |"]
            lines += [f"| {r.label} | {r.unit} | " + " | ".join(columns(sec, r)) + " |"
                      for r in sec.rows]
        if sec.notes:
            lines += ["", sec.notes]
    return "\n".join(lines) + "\n"


def write_doc(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_info(argv: Sequence[str], rev: str | None, load_at_start: str) -> dict[str, str]:
    def first(cmd: list[str], pattern: str = "") -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        text = (out.stdout + out.stderr).strip()
        for line in text.splitlines():
            if pattern in line:
                return line.strip()
        return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    debian = "?"
    with contextlib.suppress(OSError), gzip.open(harness.DEBIAN_DOCS / "changelog.Debian.gz", "rt") as fh:
        debian = fh.readline().split()[1].strip("()")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["bench/run", *argv]),
        "CPUs (nproc)": str(os.cpu_count()),
        "load average (1, 5, 15 min) at start / end": f"{load_at_start} / {loadavg()}",
        "CPU model": cpu,
        "kernel": platform.release(),
        "Python (ours)": platform.python_version(),
        "ours": harness.describe_source(rev),
        "1.2": f"Debian package portsentry {debian}, unpacked by scripts/fetch-debian-portsentry",
        "nmap": first(["nmap", "--version"], "Nmap version"),
        "hping3": first(["hping3", "--version"], "version"),
    }


# ---------------------------------------------------------------------------------------------
# Profiling (not part of the figures)


def profile(directory: Path, rate: int, count: int, interval_us: int, source: Path | None) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    report: list[str] = []
    for name, run in (
        ("scan", lambda subject: measure_scan(subject, rate)),
        ("flood", lambda subject: measure_flood(subject, False, count, interval_us)),
        ("flood-ignored", lambda subject: measure_flood(subject, True, count, interval_us)),
    ):
        out = directory / f"ours-{name}.pstats"
        run(harness.Ours(profile_to=out, source=source))
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not out.exists():
            report.append(f"{name}: no profile written to {out}")
            continue
        buffer = io.StringIO()
        stats = pstats.Stats(str(out), stream=buffer)
        stats.strip_dirs().sort_stats("tottime").print_stats(15)
        report.append(f"==== cProfile of our daemon's main thread, {name} (by own time)\n{buffer.getvalue()}")
    return "\n".join(report)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--only", action="append", choices=(*PARTS, "capture", "kernel", "report", "fleet",
                                                          *many_bans.PARTS),
                        help="run only this part (repeatable; default: all but capture and the "
                        "issue-10 parts idle, startup and stalls, which bench/many_bans.py runs "
                        "and which write their own section of docs/performance.md)")
    parser.add_argument("--with-capture", action="store_true",
                        help="also rerun bench/capture_mechanisms.py (about 6 minutes; figures in "
                        "docs/capture.md)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure and daemon (default 3)")
    parser.add_argument("--rates", default="50000,20000", help="nmap --min-rate values (default 50000,20000)")
    parser.add_argument("--latency-probes", type=int, default=30)
    parser.add_argument("--flood-count", type=int, default=10_000)
    parser.add_argument("--flood-interval-us", type=int, default=50)
    parser.add_argument("--spoof-sources", type=int, default=1_000_000,
                        help="IPv6 sources in the spoofed flood (default 1000000; IPv4 always uses "
                        f"the {SPOOF_IPV4_SOURCES} addresses of 198.18.0.0/15 outside the rig's /23)")
    parser.add_argument("--spoof-checkpoint", type=int, default=100_000,
                        help="first RSS reading after this many sources (default 100000)")
    parser.add_argument("--spoof-pps", type=float, default=20_000,
                        help="spoofed SYNs per second (default 20000)")
    parser.add_argument("--normal-seconds", type=float, default=10.0,
                        help="length of the normal-traffic window (default 10, at most 60)")
    parser.add_argument("--normal-udp-pps", type=float, default=2000.0,
                        help="UDP datagrams per second in the normal-traffic part (default 2000)")
    parser.add_argument("--idle-sizes", default=",".join(str(n) for n in many_bans.SIZES),
                        help="idle part: numbers of active bans (default 1000,10000,100000,1000000)")
    parser.add_argument("--idle-seconds", type=float, default=60.0,
                        help="idle part: window at 100k bans (default 60)")
    parser.add_argument("--idle-scaling-seconds", type=float, default=30.0,
                        help="idle part: window at the other sizes (default 30)")
    parser.add_argument("--ready-bound", type=float, default=60.0,
                        help="idle/startup: longest wait for READY before the run is reported as "
                        "not ready (default 60)")
    parser.add_argument("--stall-hang", type=float, default=30.0,
                        help="stalls part: seconds each KILL_ROUTE hangs (default 30)")
    parser.add_argument("--issue10-label", default="Before the redesign",
                        help="label of the issue-10 results (default 'Before the redesign')")
    parser.add_argument("--py-spy-dir", type=Path, metavar="DIR",
                        help="idle/startup: py-spy dump of the daemon at the end of each window "
                        "(py-spy from $PY_SPY or PATH) into DIR; not part of the figures")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--ours-log-stderr", action="store_true",
                        help="run ours with --log-stderr too (1.2 has no such copy; off by default)")
    parser.add_argument("--ours-rev", metavar="REV",
                        help="benchmark our daemon as committed in git revision REV (exported with "
                        "git archive) instead of the working tree")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="afterwards profile our daemon (cProfile) in a scan and a flood; "
                        "write DIR/*.pstats and print the top functions")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.latency_probes < 1 or args.flood_count < 1:
        parser.error("--repeat, --latency-probes and --flood-count must be at least 1")
    if args.flood_count > 100_000:
        parser.error("--flood-count is capped at 100000")
    if not 0 < args.spoof_checkpoint < min(args.spoof_sources, SPOOF_IPV4_SOURCES + 1):
        parser.error(f"--spoof-checkpoint must be below --spoof-sources and {SPOOF_IPV4_SOURCES}")
    if not 1 <= args.normal_seconds <= 60 or not 1 <= args.normal_udp_pps <= 100_000:
        parser.error("--normal-seconds must be 1-60 and --normal-udp-pps 1-100000")
    sizes = [int(n) for n in args.idle_sizes.split(",") if n]
    if not sizes or any(not 1 <= n <= 2_000_000 for n in sizes):
        parser.error("--idle-sizes: numbers from 1 to 2000000")
    if not 0 < args.idle_seconds <= 600 or not 0 < args.idle_scaling_seconds <= 600:
        parser.error("--idle-seconds and --idle-scaling-seconds must be 1-600")
    if not 1 <= args.ready_bound <= 600 or not 1 <= args.stall_hang <= 120:
        parser.error("--ready-bound must be 1-600 and --stall-hang 1-120")
    if args.spoof_sources > 2_000_000 or not 1000 <= args.spoof_pps <= 100_000:
        parser.error("--spoof-sources is capped at 2000000 and --spoof-pps must be 1000-100000")
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.ours_rev is None:
        return measure_all(args, argv, None)
    # Resolved now: a name like HEAD may point elsewhere by the time the results are written.
    args.ours_rev = harness.resolve_revision(args.ours_rev)
    exported = run_tempdir("bench-src")
    try:
        return measure_all(args, argv, harness.export_revision(args.ours_rev, exported))
    finally:
        shutil.rmtree(exported, ignore_errors=True)


def measure_all(args: argparse.Namespace, argv: Sequence[str], source: Path | None) -> int:
    load_at_start = loadavg()
    if float(load_at_start.split()[0]) > 0.5:
        print(f"bench/run: warning: load average {load_at_start} - other work on this machine will "
              "show in the figures", file=sys.stderr)
    only = set(args.only or PARTS)
    if args.with_capture:
        only.add("capture")
    if "fleet" in only:
        block = fleet_bench.measure(" ".join(["bench/run", *argv]), args.ours_rev, load_at_start)
        print(block)
        if not args.no_write:
            fleet_bench.write_block(args.doc, block)
            print(f"issue-12 results written to {args.doc}")
        only.discard("fleet")
        if not only:
            return 0
    if "report" in only:
        block = report_bench.measure(args.repeat, " ".join(["bench/run", *argv]), args.ours_rev,
                                     load_at_start)
        print(block)
        if not args.no_write:
            report_bench.write_block(args.doc, block)
            print(f"issue-13 results written to {args.doc}")
        only.discard("report")
        if not only:
            return 0
    if "kernel" in only:
        block = kernel_path.measure(args.repeat, 50_000, "First-probe ban", " ".join(["bench/run", *argv]),
                                    source, args.ours_rev, load_at_start)
        print(block)
        if not args.no_write:
            kernel_path.write_block(args.doc, block)
            print(f"issue-11 results written to {args.doc}")
        only.discard("kernel")
        if not only:
            return 0
    issue10 = only & set(many_bans.PARTS)
    if issue10:
        block = many_bans.measure(
            issue10, repeat=args.repeat, sizes=[int(n) for n in args.idle_sizes.split(",") if n],
            idle_seconds=args.idle_seconds, scaling_seconds=args.idle_scaling_seconds,
            ready_bound=args.ready_bound, hang=args.stall_hang, spy_dir=args.py_spy_dir,
            label=args.issue10_label, command=" ".join(["bench/run", *argv]), load_at_start=loadavg,
            source=source, rev=args.ours_rev)
        print(block)
        if not args.no_write:
            many_bans.write_block(args.doc, block, args.issue10_label)
            print(f"issue-10 results written to {args.doc}")
        only -= issue10
        if not only:
            return 0
    ours = harness.Ours(log_stderr=args.ours_log_stderr, source=source)
    subjects: list[Subject] = [ours, harness.Debian12()]
    # Ours with a native block (BAN_BACKEND="nftables", NFLOG capture) as a third column where the
    # issue "Stealth and advanced detection" sets goals for it: scan, latency, normal traffic.
    native = harness.OursNative(log_stderr=args.ours_log_stderr, source=source)
    with_native: list[Subject] = [ours, native, harness.Debian12()]
    rates = [int(r) for r in args.rates.split(",") if r]

    def orders(among: list[Subject] = subjects) -> Iterator[list[Subject]]:
        # Alternate who goes first, so a warm or cold machine favours neither.
        for i in range(args.repeat):
            yield among if i % 2 == 0 else among[::-1]

    sections: list[Section] = []
    if "scan" in only:
        for rate in rates:
            scans: dict[str, list[ScanResult]] = {s.name: [] for s in with_native}
            for order in orders(with_native):
                for subject in order:
                    print(f"scan {rate}/s: {subject.label} ...", file=sys.stderr, flush=True)
                    scans[subject.name].append(measure_scan(subject, rate))
            sections.append(scan_section(scans, rate))
    if "latency" in only:
        latencies: dict[str, list[LatencyResult]] = {s.name: [] for s in with_native}
        for run, order in enumerate(orders(with_native)):
            for subject in order:
                print(f"latency, run {run + 1}: {subject.label} ...", file=sys.stderr, flush=True)
                latencies[subject.name].append(measure_latency(subject, args.latency_probes, run))
        sections.append(latency_section(latencies, args.latency_probes))
    if "flood" in only:
        floods: dict[tuple[str, bool], list[FloodResult]] = {
            (s.name, ig): [] for s in with_native for ig in (False, True)}
        for order in orders(with_native):
            for ignored in (False, True):
                for subject in order:
                    print(f"flood ({'ignored' if ignored else 'blocked'} source): {subject.label} ...",
                          file=sys.stderr, flush=True)
                    floods[(subject.name, ignored)].append(
                        measure_flood(subject, ignored, args.flood_count, args.flood_interval_us))
        sections.append(flood_section(floods, args.flood_count, args.flood_interval_us))
    if "spoof" in only:
        spoofs: dict[tuple[str, int], list[SpoofResult]] = {}
        counts = {6: args.spoof_sources, 4: SPOOF_IPV4_SOURCES}
        plan = [(ours, 6), *((subject, 4) for subject in subjects)]
        for subject, family in plan:
            print(f"spoofed flood, IPv{family}, {counts[family]} sources: {subject.label} ...",
                  file=sys.stderr, flush=True)
            spoofs.setdefault((subject.name, family), []).append(
                measure_spoof(subject, family, counts[family], args.spoof_checkpoint, args.spoof_pps))
        sections.append(spoof_section(spoofs, counts, args.spoof_checkpoint, args.spoof_pps))
    if "bans" in only:
        print("bans: bench/ban_backends.py ...", file=sys.stderr, flush=True)
        try:
            sections.append(bans_section(ban_backends.measure(source)))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            raise BenchError(f"ban backends: {error}") from error
    if "normal" in only:
        normals: dict[str, list[NormalResult]] = {s.name: [] for s in with_native}
        for order in orders(with_native):
            for subject in order:
                print(f"normal traffic, {args.normal_seconds:.0f} s: {subject.label} ...",
                      file=sys.stderr, flush=True)
                normals[subject.name].append(
                    measure_normal(subject, args.normal_seconds, args.normal_udp_pps))
        sections.append(normal_section(normals, args.normal_seconds, args.normal_udp_pps))
    if "capture" in only:
        sections.append(capture_section())

    summary = summary_section(sections)
    if summary is not None and len(sections) > 1:
        sections.insert(0, summary)
    info = machine_info(argv, args.ours_rev, load_at_start)
    print(f"\nours = this PortSentry, 1.2 = {info['1.2']}; {info['CPU model']}, "
          f"{info['CPUs (nproc)']} CPUs, kernel {info['kernel']}")
    print(render_text(sections))
    if not args.no_write:
        write_doc(args.doc, render_markdown(sections, info, args.repeat))
        print(f"results written to {args.doc}")
    if args.profile is not None:
        print(profile(args.profile, rates[0] if rates else 50_000, args.flood_count,
                      args.flood_interval_us, source))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run: needs root (network namespaces, raw sockets)", file=sys.stderr)
        return 2

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGHUP too: an ssh session that drops must not leave the namespaces behind.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    try:
        return run(args, argv)
    except BenchError as error:
        print(f"bench/run: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/run: interrupted", file=sys.stderr)
        return 130
    finally:
        # Anything this process created that a failed step left behind.
        with Shield():
            exclude = {os.getpid()} | ({pid} if (pid := reaper_pid()) is not None else set())
            left = reaper.sweep(RUN_PREFIX, RUN_ID, exclude)
            if left:
                print(f"bench/run: removed what was left behind: {left.describe()}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
