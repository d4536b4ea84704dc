"""Our daemon's CPU per probe with no kernel capture in the way:
`sudo .venv/bin/python -m bench.hot_path --probes 20000 --repeat 5`.

The flood part of bench/run measures CPU per 10k probes against 1.2, but on this 2-CPU machine
its figures move by about 10% from one run to the next, more than most single changes to the
probe path save. This replays prebuilt packets through the daemon's own code instead: the real
`portsentry` main (bench/perf.py's configuration, -atcp, syslog to a socket drained here) with
only the capture replaced by a list of packets, in a fresh target namespace (rig.py) so that
the daemon's address and listener lookups see the rig's addresses. Two streams:
- `blocked`: every SYN to port 79 from one source, which the first one blocks (KILL_ROUTE);
  the rest each log the detection and the already-blocked line, as in the flood part;
- `new`: each SYN from a new source (the rate cap refuses all but the first 60 bans).
It prints the median process CPU per probe (all threads) from the first packet handed over to
the last one done, and the main thread's alone (the probe path without the workers), with the
range over the runs: the machine's noise is in the range, the cost of the code nearer its low
end. Not a figure against 1.2 (1.2 cannot be fed this way): compare revisions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.system import rig
from tests.system.teardown import Shield, run_tempdir

from bench import harness

STREAMS = ("blocked", "new")
BATCH = 64  # packets per read, about what a flood leaves waiting per wake-up


def syn(source: int, destination: bytes, port: int) -> bytes:
    """An IPv4 TCP SYN as AF_PACKET SOCK_DGRAM delivers it (from the IP header on)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, source.to_bytes(4, "big"),
                     destination)
    return ip + struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 0x50, 0x02, 1024, 0, 0)


def packets(stream: str, count: int) -> list[bytes]:
    target = socket.inet_aton("198.18.0.1")
    first = int.from_bytes(socket.inet_aton("198.18.0.3"), "big")
    if stream == "blocked":
        return [syn(first, target, 79)] * count
    return [syn(first + 0x100 + n, target, 79) for n in range(count)]  # 198.18.1.3 on


def inner(conf: str, log: str, stream: str, count: int) -> None:
    """In the target namespace: run the daemon on the packets; print {"cpu_us": per probe}."""
    import signal

    from portsentry.cli.main import main as portsentry_main
    from portsentry.service import wiring

    # The log socket is drained by a child process: a thread here would add its CPU to ours.
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(log)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    counted_read, counted_write = os.pipe()
    drainer = os.fork()
    if drainer == 0:
        received = 0
        sink.settimeout(1.0)
        while True:
            try:
                sink.recv(65536)
            except TimeoutError:
                if os.getppid() == 1 or received:
                    break
                continue
            received += 1
        os.write(counted_write, str(received).encode())
        os._exit(0)
    sink.close()
    todo = packets(stream, count)
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")  # always readable: the daemon reads a batch every loop
    result: dict[str, float] = {}

    class Replay:
        def __init__(self) -> None:
            self.at = 0
            self.started = self.started_main = 0.0

        def fileno(self) -> int:
            return read_end

        def read_batch(self, limit: int = 256) -> list[bytes]:
            if self.at == 0:
                self.started = time.process_time()
                self.started_main = time.thread_time()
            if self.at >= len(todo):
                if "cpu_us" not in result:
                    result["cpu_us"] = (time.process_time() - self.started) / count * 1e6
                    result["main_us"] = (time.thread_time() - self.started_main) / count * 1e6
                    os.kill(os.getpid(), signal.SIGTERM)
                return []
            batch = todo[self.at:self.at + min(limit, BATCH)]
            self.at += len(batch)
            return batch

        def drops(self) -> int:
            return 0

        def quiet_udp(self, ports: frozenset[int]) -> None:
            pass

        def live_ports(self, live: object) -> None:
            pass

        def skip_sources(self, networks: object) -> None:
            pass

        before_nat = True  # as the AF_PACKET capture it stands in for

        def skip_interfaces(self, indexes: frozenset[int]) -> None:
            pass

        def close(self) -> None:
            pass

    wiring.open_packet_capture = lambda _max, _protocols: Replay()  # type: ignore[assignment,misc,return-value]
    status = portsentry_main(["-c", conf, "--syslog-socket", log, "-atcp"])
    os.waitpid(drainer, 0)
    lines = int(os.read(counted_read, 64) or b"0")
    print(json.dumps({**result, "status": status, "lines": lines}))


def one_run(stream: str, count: int) -> dict[str, float]:
    workdir = run_tempdir("hot")
    net = rig.create_namespaces(rig.new_prefix())
    try:
        conf = workdir / "portsentry.conf"
        conf.write_text(harness.config_text(workdir, ours=True))
        (workdir / "portsentry.ignore").write_text("127.0.0.1/32\n")
        out = subprocess.run(
            ["ip", "netns", "exec", net.target, sys.executable, "-m", "bench.hot_path", "--inner",
             str(conf), str(workdir / "log"), stream, str(count)],
            cwd=harness.REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
        if out.returncode != 0 or not out.stdout.strip():
            raise harness.BenchError(f"replay failed ({out.returncode}): {out.stderr[-2000:]}")
        found: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
        return found
    finally:
        with Shield():
            rig.destroy_namespaces(net.names)
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hot_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--inner", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        conf, log, stream, count = args.inner
        inner(conf, log, stream, int(count))
        return 0
    harness.require_root("bench.hot_path")
    for stream in args.streams.split(","):
        if stream not in STREAMS:
            parser.error(f"unknown stream {stream!r}")
        runs = [one_run(stream, args.probes) for _ in range(args.repeat)]
        cpu = [run["cpu_us"] for run in runs]
        main = [run["main_us"] for run in runs]
        print(f"{stream}: {statistics.median(cpu):.1f} us CPU per probe "
              f"(runs {min(cpu):.1f}-{max(cpu):.1f}), "
              f"main thread {statistics.median(main):.1f} ({min(main):.1f}-{max(main):.1f}), "
              f"{int(statistics.median(run['lines'] for run in runs))} syslog lines, {args.probes} probes")
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
