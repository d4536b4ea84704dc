"""Issue 11 ("The scanner learns nothing"): the first-probe ban in the kernel against the ban
after the daemon has read the probe, and against Debian's 1.2, in the same run. Part `kernel` of
bench/run:

- a full SYN scan (nmap --min-rate 50000, -atcp, ports 1-65535) against each: probes answered
  before the block took effect (ports nmap saw closed or open), detection lines, and the first
  detection line to the block line;
- two SYNs to a watched port from a fresh source, the second 20 µs after the first (a raw socket
  in the scanner namespace, busy-waiting between the sends): how many got an answer.

Subjects: ours with BAN_BACKEND=nftables and KERNEL_BAN=auto (the kernel path), the same with
KERNEL_BAN=off, and 1.2 with its KILL_ROUTE blackhole route. Everything runs in namespaces from
tests/system/rig.py (198.18.0.0/15) with files in temporary directories.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.system import rig

from bench import harness
from bench.harness import BenchError, Subject

BEGIN = "<!-- bench:issue11:begin (written by bench/run --only kernel) -->"
END = "<!-- bench:issue11:end -->"
TITLE = "First-probe ban in the kernel (issue 11)"
PROBE_PORT = 79

TWO_SYNS = r"""
import socket, struct, sys, time
src, dst, port, sport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
rx.settimeout(0.1)
tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
tx.bind((src, 0))  # the kernel writes the IP header: it must carry the source the checksum used
def syn(sp):
    head = struct.pack('!HHIIBBHHH', sp, port, 1, 0, 5 << 4, 0x02, 1024, 0, 0)
    data = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 6, len(head)) + head
    total = sum(struct.unpack('!%dH' % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return head[:16] + struct.pack('!H', ~total & 0xFFFF) + head[18:]
first, second = syn(sport), syn(sport + 1)
tx.sendto(first, (dst, 0))
t0 = time.perf_counter()
while time.perf_counter() - t0 < 20e-6:
    pass
tx.sendto(second, (dst, 0))
gap = time.perf_counter() - t0
answered = set()
end = time.time() + 1.0
while time.time() < end:
    try:
        data = rx.recv(100)
    except TimeoutError:
        continue
    ihl = (data[0] & 15) * 4
    sp, dp = struct.unpack('!HH', data[ihl:ihl + 4])
    if sp == port and dp in (sport, sport + 1):
        answered.add(dp - sport + 1)
print(','.join(map(str, sorted(answered))) or '-', gap * 1e6)
"""


class OursKernelOff(harness.OursNative):
    name = "ours-nft-nokernel"
    label = "this PortSentry, nftables, KERNEL_BAN=off"

    def write_common(self, workdir: Path, ignore: Sequence[str]) -> str:
        return super().write_common(workdir, ignore) + 'KERNEL_BAN="off"\n'


@dataclass
class Row:
    label: str
    answered: list[int] = field(default_factory=list)
    detections: list[int] = field(default_factory=list)
    first_to_block_ms: list[float] = field(default_factory=list)
    first_answered: list[bool] = field(default_factory=list)
    second_answered: list[bool] = field(default_factory=list)
    gaps_us: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def two_syns(subject: Subject, source: str) -> tuple[bool, bool, float]:
    """(first answered, second answered, µs between the two sends) against a fresh daemon."""
    from bench.perf import fresh

    with fresh(subject, extra_scanner_addresses=[source]) as fx:
        out = rig.run_in(fx.net.scanner, [sys.executable, "-c", TWO_SYNS, source, fx.net.target_ip4,
                                          str(PROBE_PORT), "41000"], timeout=20, check=True).stdout.split()
    answered = set(out[0].split(",")) if out[0] != "-" else set()  # "1,2", "1", or "-"
    return "1" in answered, "2" in answered, float(out[1])


def measure(repeat: int, rate: int, label: str, command: str, source: Path | None, rev: str | None,
            load_at_start: str) -> str:
    from bench.perf import measure_scan

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    described = harness.describe_source(rev)
    subjects: list[Subject] = [harness.OursNative(source=source), OursKernelOff(source=source),
                               harness.Debian12()]
    rows = {s.name: Row(s.label) for s in subjects}
    for run in range(repeat):
        for subject in subjects if run % 2 == 0 else subjects[::-1]:
            row = rows[subject.name]
            print(f"kernel: {subject.name}, run {run + 1}", file=sys.stderr, flush=True)
            try:
                scan = measure_scan(subject, rate)
                row.answered.append(scan.answered)
                row.detections.append(scan.detections)
                row.first_to_block_ms.append(scan.first_to_block_ms)
                first, second, gap = two_syns(subject, f"198.18.0.{200 + run}")
                row.first_answered.append(first)
                row.second_answered.append(second)
                row.gaps_us.append(gap)
            except (BenchError, OSError) as error:
                row.notes.append(str(error).splitlines()[0][:160])
    return render(rows, subjects, label, command, started, described, rate, load_at_start)


def _runs(values: Sequence[object]) -> str:
    return " / ".join(str(v) for v in values) if values else "-"


def render(rows: dict[str, Row], subjects: Sequence[Subject], label: str, command: str, started: str,
           described: str, rate: int, load_at_start: str) -> str:
    head = "| figure | " + " | ".join(rows[s.name].label for s in subjects) + " |"
    lines = [
        f"**{label}.** Run on {started} by `{command}` (as root) on {described}; load average at "
        f"start {load_at_start}. Every figure once per run, in run order (\"run 1 / run 2 / ...\").",
        "",
        f"A full SYN scan (`nmap -sS -p 1-65535 --min-rate {rate} --max-retries 0`) of a fresh "
        "`-atcp` daemon (ADVANCED_PORTS_TCP 1024, BLOCK_TCP 1), then, against another fresh one, "
        f"two SYNs to port {PROBE_PORT} from a fresh source, the second sent after a 20 µs busy "
        "wait; an answer is a SYN-ACK or RST back to either.",
        "",
        head,
        "| --- | " + " | ".join("---" for _ in subjects) + " |",
    ]

    def line(name: str, get: object) -> str:
        cells = []
        for s in subjects:
            values = get(rows[s.name])  # type: ignore[operator]
            cells.append(_runs(values))
        return f"| {name} | " + " | ".join(cells) + " |"

    lines += [
        line("probes answered before the block (ports nmap saw closed/open)", lambda r: r.answered),
        line("detection lines", lambda r: r.detections),
        line("first detection line to block line (ms)",
             lambda r: [f"{v:.2f}" for v in r.first_to_block_ms]),
        line("first of two SYNs answered?", lambda r: ["yes" if v else "no" for v in r.first_answered]),
        line("second SYN, 20 µs later, answered?",
             lambda r: ["yes" if v else "no" for v in r.second_answered]),
        line("gap between the two sends (µs)", lambda r: [f"{v:.0f}" for v in r.gaps_us]),
        line("note", lambda r: r.notes or ["-"]),
    ]
    medians = {s.name: statistics.median(rows[s.name].answered) for s in subjects if rows[s.name].answered}
    if "1.2" in medians and "ours-nft" in medians:
        lines += ["", f"Median probes answered before the block: kernel path {medians['ours-nft']:g}, "
                  f"1.2 {medians['1.2']:g}."]
    return "\n".join(lines) + "\n"


def write_block(doc: Path, block: str) -> None:
    harness.write_section(doc, TITLE, BEGIN, END, block)
