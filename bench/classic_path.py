"""Where a lone probe's time goes on the classic path (KILL_ROUTE through the shell), ours
against Debian's 1.2: `sudo .venv/bin/python -m bench.classic_path --probes 30`.

Both daemons get bench/perf.py's configuration and the same single SYNs (bench/synsend.py) from
fresh sources. For both, three points are measured from outside: the detection line and the
block line (the syslog receiver's kernel stamps) and the exec of `/bin/sh` in a child of the
daemon (bench/procevents.py), i.e. KILL_ROUTE started. Ours is started with bench/tracehook.py
loaded, which stamps each step inside the daemon; the report gives the median gap between
consecutive steps. Not part of the figures in docs/performance.md (the hooks cost about a
microsecond each): it says where to look.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.system import rig

from bench import harness
from bench.harness import BenchError, Receiver, Subject
from bench.procevents import ProcEvents

PORT = 79
GAP = float(os.environ.get("CLASSIC_PATH_GAP", "0.05"))  # seconds between probes


class TracedOurs(harness.Ours):
    name = "ours-traced"
    label = "this PortSentry, traced"

    def __init__(self, trace_to: Path, source: Path | None = None) -> None:
        super().__init__(source=source)
        self.trace_to = trace_to

    def argv(self, conf: Path, receiver: Receiver, mode: str) -> list[str]:
        boot = (f"import sys; sys.path.insert(0, {str(harness.REPO_ROOT)!r}); "
                f"from bench.tracehook import install; install({str(self.trace_to)!r}); "
                "import runpy; runpy.run_module('portsentry', run_name='__main__', alter_sys=True)")
        return [sys.executable, "-c", boot, "-c", str(conf), "--syslog-socket", str(receiver.path),
                *mode.split()]


@dataclass
class Probe:
    source: str
    sent: float
    detected: float | None = None
    started: float | None = None  # exec of /bin/sh in a child of the daemon
    blocked: float | None = None
    inside: dict[str, float] = field(default_factory=dict)  # first stamp of each step (ours)


# The TCP flags of each probe kind 1.2 names (--kind).
KINDS = {"syn": 0x02, "fin": 0x01, "null": 0x00, "xmas": 0x29}


def run_probes(subject: Subject, probes: int, port: int = PORT, gap: float = GAP,
               flags: int = KINDS["syn"]) -> list[Probe]:
    """Single SYNs from fresh sources (198.18.0.10 on), `gap` apart; for each, the block line,
    the detection line and the first exec in a child of the daemon, where they came. Also the
    latency part of bench/run (perf.measure_latency)."""
    from bench.perf import fresh

    sources = [f"198.18.0.{10 + i}" for i in range(probes)]
    out: list[Probe] = []
    with ProcEvents() as events, fresh(subject, extra_scanner_addresses=sources) as fx:
        for running in fx.runnings:
            events.watch(running.pid)
        rig.run_in(fx.net.scanner, ["ping", "-c", "1", "-W", "2", fx.net.target_ip4])
        sender = harness.SynSender(fx.net.scanner)
        try:
            for source in sources:
                mark = fx.receiver.count()
                probe = Probe(source, sender.send(source, fx.net.target_ip4, port, flags))
                out.append(probe)
                try:
                    probe.blocked = fx.receiver.wait_for(
                        re.compile(rf"Host {re.escape(source)} has been blocked"), 10.0, mark).at
                    probe.detected = fx.receiver.wait_for(
                        re.compile(rf"host: \S+/{re.escape(source)} to"), 1.0, mark).at
                except BenchError:
                    continue
                time.sleep(gap)
                # The first exec in a child of the daemon after the send: /bin/sh -c KILL_ROUTE
                # (the reader thread has long seen it: the block line comes after the command).
                started = events.first_exec_after(probe.sent)
                if started is not None and started.at <= probe.blocked:
                    probe.started = started.at
        finally:
            sender.close()
    return out


STEPS = ("select<", "recv<", "addresses>", "addresses<", "listeners>", "listeners<", "quiet_udp>",
         "quiet_udp<", "live_ports>", "live_ports<", "parse>", "parse<", "hits_for>", "confirm>",
         "confirm<", "hits_for<", "handle>", "ignore>", "ignore<", "engine>", "guard>", "guard<",
         "rate>", "rate<", "engine<",
         "telemetry>", "telemetry<", "tally>", "tally<", "log>", "syslog>", "syslog<", "history>", "history<",
         "submit>", "submit<", "enforce>", "store>", "store<", "carry_out>", "run_shell>", "popen>",
         "popen<", "spawn>", "spawn<", "run_shell<")


def attach(probes: list[Probe], trace: Path) -> None:
    """Each probe gets the first stamp of each step between its send and the next probe's."""
    stamps = sorted((ns / 1e9, event, detail)
                    for ns, _thread, event, detail in json.loads(trace.read_text()))
    for i, probe in enumerate(probes):
        end = probes[i + 1].sent if i + 1 < len(probes) else float("inf")
        for at, event, detail in stamps:
            if probe.sent <= at < end and event not in probe.inside:
                if event == "log>" and "attackalert" not in detail:
                    continue
                probe.inside[event] = at


def median_ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:.3f}" if values else "-"


def report(name: str, probes: list[Probe]) -> str:
    done = [p for p in probes if p.detected is not None and p.blocked is not None]
    detected = median_ms([p.detected - p.sent for p in done if p.detected])
    started = median_ms([p.started - p.sent for p in done if p.started])
    blocked = median_ms([p.blocked - p.sent for p in done if p.blocked])
    lines = [f"== {name}: {len(done)} of {len(probes)} probes blocked",
             f"   probe sent -> detection line       {detected} ms",
             f"   probe sent -> KILL_ROUTE started    {started} ms (exec of /bin/sh)",
             f"   probe sent -> block line            {blocked} ms"]
    traced = [p for p in done if p.inside]
    if traced:
        lines.append("   inside ours (median gap from the previous point, ms):")
        previous = "probe sent"
        points: list[tuple[str, list[float]]] = []
        for step in STEPS:
            gaps = []
            for p in traced:
                if step not in p.inside:
                    continue
                before = [p.inside[s] for s in STEPS[:STEPS.index(step)] if s in p.inside]
                gaps.append(p.inside[step] - (before[-1] if before else p.sent))
            if gaps:
                points.append((step, gaps))
        for step, gaps in points:
            since = [p.inside[step] - p.sent for p in traced if step in p.inside]
            lines.append(f"     {previous:>12} -> {step:<12} {median_ms(gaps):>8}"
                         f"   (at {median_ms(since)} after the send)")
            previous = step
        tails = [("detection line (receiver)", [p.detected - p.inside["syslog>"] for p in traced
                                                if p.detected and "syslog>" in p.inside]),
                 ("exec of /bin/sh", [p.started - p.inside["run_shell>"] for p in traced
                                      if p.started and "run_shell>" in p.inside]),
                 ("block line", [p.blocked - p.inside["run_shell<"] for p in traced
                                 if p.blocked and "run_shell<" in p.inside])]
        lines.append("   from a stamp inside to a point outside:")
        lines.append(f"     syslog> -> detection line received   {median_ms(tails[0][1])}")
        lines.append(f"     run_shell> -> exec of /bin/sh         {median_ms(tails[1][1])}")
        lines.append(f"     run_shell< -> block line received     {median_ms(tails[2][1])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classic_path", description=__doc__)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--ours-only", action="store_true")
    parser.add_argument("--ours-rev", help="trace this revision's src/ (git archive), not the working tree")
    parser.add_argument("--kind", choices=sorted(KINDS), default="syn",
                        help="the probes' TCP flags (default syn)")
    args = parser.parse_args(argv)
    harness.require_root("bench.classic_path")
    with tempfile.TemporaryDirectory(prefix="ps-trace-") as tmp:
        source = harness.export_revision(args.ours_rev, Path(tmp) / "rev") if args.ours_rev else None
        trace = Path(tmp) / "trace.json"
        ours = run_probes(TracedOurs(trace, source), args.probes, flags=KINDS[args.kind])
        if trace.exists():
            attach(ours, trace)
        print(report(f"ours (traced), {harness.describe_source(args.ours_rev)}", ours))
    if not args.ours_only:
        print(report("1.2", run_probes(harness.Debian12(), args.probes, flags=KINDS[args.kind])))
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
