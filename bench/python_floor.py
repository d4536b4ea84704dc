"""The floor for the classic path in Python: `sudo .venv/bin/python -m bench.python_floor`.

Issue 11 asks for the classic path's detection line (and KILL_ROUTE's start) at or below 1.2's.
This measures what the least Python can do, under the same bench as bench/classic_path.py
(fresh namespaces, single SYNs from fresh sources 50 ms apart, the syslog receiver's kernel
stamps, the exec of /bin/sh seen by the process events connector), against Debian's 1.2.

The subject is not the daemon: it is the loop below, with nothing a real daemon needs (no
own-address, broadcast, forgery or watch-list checks, no ignore list, engine, guard, trigger,
rate cap, store or worker thread): the daemon's AF_PACKET socket and BPF filter, one epoll
wait, recv, one struct unpack, a set lookup, the listener check, the line, then posix_spawn of
`/bin/sh -c true` from the same thread. Three variants of the listener check: none, the
daemon's SockDiag.holds, a bare send/recv of a cached sock_diag request, and the
kernel's exact lookup for the packet (an inet_diag request without NLM_F_DUMP). If even this loop
does not beat 1.2, no arrangement of the daemon's Python will.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import harness
from bench.classic_path import report, run_probes
from bench.harness import Receiver

LOOP = r'''
import os, select, socket, struct, sys, time
from portsentry.core.probe import Protocol
from portsentry.sensors.bpf import build_probe_filter
from portsentry.sensors.capture import CaptureSocket
from portsentry.sensors.sockdiag import TCPDIAG_GETSOCK, SockDiag, tcp_request_any_family
from portsentry.netlink.codec import NLM_F_REQUEST, message
SOCK_DIAG_BY_FAMILY = 20
HEAD = struct.Struct("=BBBxIHH")

def exact_request(data, dport):
    # The kernel's own lookup for this packet (no dump): local address and port, remote ones.
    sport = struct.unpack_from("!H", data, (data[0] & 15) * 4)[0]
    body = (HEAD.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF, socket.htons(dport),
                      socket.htons(sport))
            + data[16:20] + bytes(12) + data[12:16] + bytes(12) + b"\0\0\0\0" + b"\xff" * 8)
    return message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 0, body)

check, path = sys.argv[1], sys.argv[2]
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
log.connect(path)
pid = os.getpid()

def send(text):
    log.send(f"<21>{time.strftime('%b %e %H:%M:%S')} portsentry[{pid}]: {text}".encode())

capture = CaptureSocket(build_probe_filter({Protocol.TCP}, max_port=1024))
diag = SockDiag()
bare = diag._sock
requests = [tcp_request_any_family(0, port) for port in range(1024)]
sock = capture._sock
poller = select.epoll()
poller.register(sock.fileno(), select.EPOLLIN)
blocked = set()
send("adminalert: PortSentry is now active and listening.")
while True:
    poller.poll()
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            break
        if data[0] >> 4 != 4:
            continue
        dport = struct.unpack_from("!H", data, (data[0] & 15) * 4 + 2)[0]
        source = socket.inet_ntoa(data[12:16])
        if source in blocked:
            continue
        if check == "sockdiag" and diag.holds(Protocol.TCP, dport):
            continue
        if check == "exact":
            bare.send(exact_request(data, dport))
            if struct.unpack_from("=H", bare.recv(65536), 4)[0] == SOCK_DIAG_BY_FAMILY:
                continue
        if check == "bare":
            bare.send(requests[dport])
            if struct.unpack_from("=H", bare.recv(65536), 4)[0] == TCPDIAG_GETSOCK:
                continue
        send(f"attackalert: TCP SYN/Normal scan from host: {source}/{source} to TCP port: {dport}")
        blocked.add(source)
        os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "true"], os.environ)
        send(f"attackalert: Host {source} has been blocked via wrappers with string: \"ALL: {source}\"")
'''

CHECKS = ("none", "exact", "bare", "sockdiag")


class Floor(harness.Ours):
    name = "python-floor"
    label = "the least Python can do"

    def __init__(self, check: str) -> None:
        super().__init__()
        self.check = check

    def argv(self, conf: Path, receiver: Receiver, mode: str) -> list[str]:
        return [sys.executable, "-c", LOOP, self.check, str(receiver.path)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.python_floor", description=__doc__)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"listener checks to try, of {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    harness.require_root("bench.python_floor")
    for check in args.checks.split(","):
        if check not in CHECKS:
            parser.error(f"unknown check {check!r}")
        print(report(f"python floor, listener check: {check}", run_probes(Floor(check), args.probes)))
        print(report("1.2, in the same round", run_probes(harness.Debian12(), args.probes)))
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
