"""User and system CPU of each daemon thread during the flood part's blocked-source flood:
`sudo .venv/bin/python -m bench.flood_threads --repeat 2`.

The flood part of bench/run gives one CPU figure per daemon. This splits it: the same
configuration and the same `hping3` flood (10k SYNs to port 79 from one source, 50 µs apart,
bench/perf.py), with utime and stime read per thread from /proc/PID/task/*/stat before the flood
and once the daemon is idle again (clock ticks, 10 ms). It says whether a gap to 1.2 is the
interpreter's (user) or the kernel's (system) and which thread spends it. Not a figure on its own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import harness, perf

Times = dict[str, tuple[str, int, int]]  # thread id -> (name, utime, stime) in clock ticks
TICK = os.sysconf("SC_CLK_TCK")


def per_thread(pid: int) -> Times:
    found: Times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "stat").read_text()
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        found[task.name] = (name, int(fields[11]), int(fields[12]))
    return found


def one_flood(subject: harness.Subject, count: int, interval_us: int) -> list[str]:
    with perf.fresh(subject, extra_scanner_addresses=[perf.FLOOD_SOURCE]) as fx:
        pid = fx.running.pid
        before = per_thread(pid)
        harness.hping_flood(fx.net.scanner, fx.net.target_ip4, perf.FLOOD_SOURCE, perf.WATCHED_PORT,
                            count, interval_us, timeout=max(30.0, count * interval_us / 1e6 * 5))
        harness.settle(fx.receiver, pid)
        after = per_thread(pid)
    rows = []
    for tid, (name, user, system) in sorted(after.items()):
        _name, user0, system0 = before.get(tid, (name, 0, 0))
        if user - user0 or system - system0:
            rows.append(f"   thread {tid} ({name}): user {(user - user0) / TICK:.2f} s, "
                        f"system {(system - system0) / TICK:.2f} s")
    return rows or ["   no thread used a clock tick"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood_threads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--interval-us", type=int, default=50)
    args = parser.parse_args(argv)
    harness.require_root("bench.flood_threads")
    for run in range(1, args.repeat + 1):
        for subject in (harness.Ours(), harness.Debian12()):
            print(f"== run {run}: {subject.label}, {args.count} SYNs from one blocked source")
            print("\n".join(one_flood(subject, args.count, args.interval_us)))
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
