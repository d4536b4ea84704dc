"""Runs this PortSentry and Debian's PortSentry 1.2 against the same scans in fresh namespaces and
prints the figures side by side with ratios; also rewrites the results block of
docs/performance.md. Start it through bench/run (root needed)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import io
import math
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tests.system import rig

from bench import harness
from bench.harness import ALREADY, BLOCKED, DETECTION, BenchError, Receiver, Running, Subject

DOC = harness.REPO_ROOT / "docs" / "performance.md"
BEGIN = "<!-- bench:results:begin (written by bench/run; edits inside are overwritten) -->"
END = "<!-- bench:results:end -->"

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


@contextlib.contextmanager
def fresh(subject: Subject, ignore: Sequence[str] = BASE_IGNORE,
          extra_scanner_addresses: Sequence[str] = ()) -> Iterator[Fixture]:
    """New namespaces, receiver and daemon; all of it removed afterwards, also on errors."""
    workdir = Path(tempfile.mkdtemp(prefix="ps-bench-", dir="/tmp"))
    net = rig.create_namespaces(rig.new_prefix())
    receiver: Receiver | None = None
    running: Running | None = None
    try:
        harness.add_addresses(net.scanner, "eth0", extra_scanner_addresses, 24)
        receiver = Receiver(workdir / "log", net.target)
        running = subject.start(net, workdir, receiver, ignore)
        yield Fixture(net, receiver, running, receiver.count())
    finally:
        try:
            if running is not None:
                subject.stop(running)
        finally:
            try:
                rig.destroy_namespaces(net.names)
            finally:
                if receiver is not None:
                    receiver.close()
                shutil.rmtree(workdir, ignore_errors=True)


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


def measure_scan(subject: Subject, rate: int) -> ScanResult:
    with fresh(subject) as fx:
        pid = fx.running.pid
        cpu0 = harness.cpu_seconds(pid)
        scan = harness.nmap_scan(fx.net.scanner, fx.net.target_ip4, rate)
        cpu1 = harness.settle(fx.receiver, pid)
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
        already=sum(1 for e in entries if ALREADY.search(e.message)),
        cpu=cpu1 - cpu0,
        first_to_block_ms=(block_at - detections[0].at) * 1000,
        start_to_first_ms=(detections[0].at - scan.started) * 1000,
        scan_s=scan.finished - scan.started,
        catchup_s=max(0.0, entries[-1].at - scan.finished),
        peak_rss_mib=rss,
    )


@dataclass(frozen=True)
class LatencyResult:
    detect_ms: list[float]
    block_ms: list[float]
    missed: int


def measure_latency(subject: Subject, probes: int) -> LatencyResult:
    sources = [f"198.18.0.{10 + i}" for i in range(probes)]
    if probes > 200:
        raise BenchError("at most 200 latency probes (one fresh source address each)")
    detect: list[float] = []
    block: list[float] = []
    missed = 0
    with fresh(subject, extra_scanner_addresses=sources) as fx:
        # Resolve the target's MAC first, so no probe waits for ARP.
        rig.run_in(fx.net.scanner, ["ping", "-c", "1", "-W", "2", fx.net.target_ip4])
        sender = harness.SynSender(fx.net.scanner)
        try:
            for source in sources:
                mark = fx.receiver.count()
                sent = sender.send(source, fx.net.target_ip4, WATCHED_PORT)
                try:
                    blocked = fx.receiver.wait_for(
                        re.compile(rf"Host {re.escape(source)} has been blocked"), 10.0, mark)
                except BenchError:
                    missed += 1
                    continue
                seen = fx.receiver.wait_for(re.compile(rf"host: \S+/{re.escape(source)} to"), 1.0, mark)
                detect.append((seen.at - sent) * 1000)
                block.append((blocked.at - sent) * 1000)
                time.sleep(0.05)
        finally:
            sender.close()
    return LatencyResult(detect, block, missed)


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

    def cell(self, values: list[float]) -> str:
        if not values:
            return "-"
        med = statistics.median(values)
        text = f"{med:.{self.decimals}f}"
        if len(values) > 1 and min(values) != max(values):
            text += f" ({min(values):.{self.decimals}f}-{max(values):.{self.decimals}f})"
        return text

    def ratio(self) -> str:
        if not self.ours or not self.theirs:
            return "-"
        a, b = statistics.median(self.ours), statistics.median(self.theirs)
        if b == 0:
            return "-" if a == 0 else "inf"
        return f"{a / b:.2f}"


@dataclass
class Section:
    title: str
    how: str
    rows: list[Row]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (with 30 samples p99 is the slowest one)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def scan_section(results: dict[str, list[ScanResult]], rate: int) -> Section:
    def row(label: str, unit: str, get: Callable[[ScanResult], float], decimals: int = 0) -> Row:
        return Row(label, unit, [get(r) for r in results["ours"]], [get(r) for r in results["1.2"]],
                   decimals)

    return Section(
        f"Full SYN scan, nmap --min-rate {rate}, -atcp",
        f"`nmap -sS -p- --min-rate {rate} -n -Pn --max-retries 0 198.18.0.1` from the scanner "
        f"namespace; reproduce with `bench/run --only scan --rates {rate}`",
        [
            row("probes nmap sent", "packets", lambda r: r.sent),
            row("probes to watched ports (1-1023 minus 113,139)", "packets", lambda r: r.watched),
            row("detection lines before the first block line", "lines", lambda r: r.before_block),
            row("detection lines in total", "lines", lambda r: r.detections),
            row("distinct ports in detection lines", "ports", lambda r: r.distinct_ports),
            row("already-blocked lines", "lines", lambda r: r.already),
            row("daemon CPU, scan start until idle (incl. children)", "s", lambda r: r.cpu, 2),
            row("first detection line -> block line", "ms", lambda r: r.first_to_block_ms, 1),
            row("nmap launched -> first detection line", "ms", lambda r: r.start_to_first_ms, 1),
            row("nmap run time", "s", lambda r: r.scan_s, 2),
            row("last line arrived after nmap ended", "s", lambda r: r.catchup_s, 2),
            row("peak RSS (VmHWM)", "MiB", lambda r: r.peak_rss_mib, 1),
        ],
    )


def latency_section(results: dict[str, list[LatencyResult]], probes: int) -> Section:
    def pooled(name: str, get: Callable[[LatencyResult], list[float]]) -> list[float]:
        return [v for r in results[name] for v in get(r)]

    def row(label: str, get: Callable[[LatencyResult], list[float]], q: float) -> Row:
        ours, theirs = pooled("ours", get), pooled("1.2", get)
        return Row(label, "ms", [percentile(ours, q)] if ours else [],
                   [percentile(theirs, q)] if theirs else [], 2)

    return Section(
        f"First probe to block, {probes} single SYNs from fresh addresses",
        f"one SYN to port {WATCHED_PORT} from each of 198.18.0.10-198.18.0.{9 + probes} (bench/synsend.py, "
        "raw socket, send time taken just before sendto); time until the receiver got the line; "
        f"reproduce with `bench/run --only latency --latency-probes {probes}`",
        [
            row("probe sent -> detection line, median", lambda r: r.detect_ms, 50),
            row("probe sent -> detection line, p99", lambda r: r.detect_ms, 99),
            row("probe sent -> block line, median", lambda r: r.block_ms, 50),
            row("probe sent -> block line, p99", lambda r: r.block_ms, 99),
            Row("probes with no block line within 10 s", "probes",
                [float(sum(r.missed for r in results["ours"]))],
                [float(sum(r.missed for r in results["1.2"]))]),
        ],
    )


def flood_section(results: dict[tuple[str, bool], list[FloodResult]], count: int,
                  interval_us: int) -> Section:
    rows: list[Row] = []
    for ignored in (False, True):
        who = "ignored source" if ignored else "blocked source"

        def row(label: str, unit: str, get: Callable[[FloodResult], float], decimals: int = 0,
                ignored: bool = ignored) -> Row:
            return Row(label, unit, [get(r) for r in results[("ours", ignored)]],
                       [get(r) for r in results[("1.2", ignored)]], decimals)

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


def render_text(sections: list[Section]) -> str:
    out: list[str] = []
    for sec in sections:
        out.append(f"\n== {sec.title}\n   {sec.how}")
        width = max(len(f"{r.label} [{r.unit}]") for r in sec.rows)
        cols = [(f"{r.label} [{r.unit}]", r.cell(r.ours), r.cell(r.theirs), r.ratio()) for r in sec.rows]
        w1 = max(len("ours"), *(len(c[1]) for c in cols))
        w2 = max(len("1.2"), *(len(c[2]) for c in cols))
        out.append(f"   {'figure':<{width}}  {'ours':>{w1}}  {'1.2':>{w2}}  ours/1.2")
        out.extend(f"   {a:<{width}}  {b:>{w1}}  {c:>{w2}}  {d:>8}" for a, b, c, d in cols)
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
        "ours / 1.2 of the medians.",
    ]
    for sec in sections:
        lines += ["", f"### {sec.title}", "", sec.how + ".", "",
                  "| figure | unit | ours | 1.2 | ours/1.2 |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r.label} | {r.unit} | {r.cell(r.ours)} | {r.cell(r.theirs)} | {r.ratio()} |"
                  for r in sec.rows]
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
    parser.add_argument("--only", action="append", choices=("scan", "latency", "flood"),
                        help="run only this measurement (repeatable; default all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure and daemon (default 3)")
    parser.add_argument("--rates", default="50000,20000", help="nmap --min-rate values (default 50000,20000)")
    parser.add_argument("--latency-probes", type=int, default=30)
    parser.add_argument("--flood-count", type=int, default=10_000)
    parser.add_argument("--flood-interval-us", type=int, default=50)
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
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.ours_rev is None:
        return measure_all(args, argv, None)
    exported = Path(tempfile.mkdtemp(prefix="ps-bench-src-", dir="/tmp"))
    try:
        return measure_all(args, argv, harness.export_revision(args.ours_rev, exported))
    finally:
        shutil.rmtree(exported, ignore_errors=True)


def measure_all(args: argparse.Namespace, argv: Sequence[str], source: Path | None) -> int:
    load_at_start = loadavg()
    if float(load_at_start.split()[0]) > 0.5:
        print(f"bench/run: warning: load average {load_at_start} - other work on this machine will "
              "show in the figures", file=sys.stderr)
    only = set(args.only or ("scan", "latency", "flood"))
    ours = harness.Ours(log_stderr=args.ours_log_stderr, source=source)
    subjects: list[Subject] = [ours, harness.Debian12()]
    rates = [int(r) for r in args.rates.split(",") if r]

    def orders() -> Iterator[list[Subject]]:
        # Alternate who goes first, so a warm or cold machine favours neither.
        for i in range(args.repeat):
            yield subjects if i % 2 == 0 else subjects[::-1]

    sections: list[Section] = []
    if "scan" in only:
        for rate in rates:
            scans: dict[str, list[ScanResult]] = {"ours": [], "1.2": []}
            for order in orders():
                for subject in order:
                    print(f"scan {rate}/s: {subject.label} ...", file=sys.stderr, flush=True)
                    scans[subject.name].append(measure_scan(subject, rate))
            sections.append(scan_section(scans, rate))
    if "latency" in only:
        latencies: dict[str, list[LatencyResult]] = {"ours": [], "1.2": []}
        for subject in subjects:
            print(f"latency: {subject.label} ...", file=sys.stderr, flush=True)
            latencies[subject.name].append(measure_latency(subject, args.latency_probes))
        sections.append(latency_section(latencies, args.latency_probes))
    if "flood" in only:
        floods: dict[tuple[str, bool], list[FloodResult]] = {
            (s.name, ig): [] for s in subjects for ig in (False, True)}
        for order in orders():
            for ignored in (False, True):
                for subject in order:
                    print(f"flood ({'ignored' if ignored else 'blocked'} source): {subject.label} ...",
                          file=sys.stderr, flush=True)
                    floods[(subject.name, ignored)].append(
                        measure_flood(subject, ignored, args.flood_count, args.flood_interval_us))
        sections.append(flood_section(floods, args.flood_count, args.flood_interval_us))

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

    signal.signal(signal.SIGTERM, on_term)
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
        leftovers = rig.list_namespaces(rig.RUN_PREFIX)
        if leftovers:
            rig.destroy_namespaces(leftovers)


if __name__ == "__main__":
    sys.exit(main())
