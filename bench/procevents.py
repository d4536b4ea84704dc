"""When a daemon under test starts its KILL_ROUTE command, seen from the kernel: the process
events connector (netlink, NETLINK_CONNECTOR / CN_IDX_PROC) reports every fork and exec on the
machine with the kernel's own monotonic stamp. The bench watches for the first exec in a child
of the daemon's process after a probe was sent: that is `/bin/sh -c KILL_ROUTE` starting, for
ours (subprocess / posix_spawn) and for 1.2 (system()) alike, without changing the command or
either daemon.

Thread: one reader thread per ProcEvents, started by `open` and stopped by `close`; it only
appends to lists that the bench reads under a lock. The connector lives in the initial network
namespace, where the bench itself runs; it needs CAP_NET_ADMIN (the bench runs as root).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns (CLOCK_MONOTONIC)
_FORK = struct.Struct("=iiii")  # parent pid, parent tgid, child pid, child tgid
_EXEC = struct.Struct("=ii")  # process pid, process tgid


@dataclass(frozen=True, slots=True)
class Exec:
    pid: int
    at: float  # time.time() scale (converted from the kernel's monotonic stamp)


def _message(op: int) -> bytes:
    payload = struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


class ProcEvents:
    """Forks and execs anywhere on the machine, kept only for children of `parents` (tgids)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._parents: set[int] = set()
        self._children: set[int] = set()
        self._execs: list[Exec] = []
        # CLOCK_REALTIME - CLOCK_MONOTONIC now; taken again for each stamp's conversion would be
        # no better (the two clocks drift by NTP slewing only, parts per million).
        self._offset = time.time_ns() - time.monotonic_ns()

    def open(self) -> ProcEvents:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind((0, CN_IDX_PROC))
            sock.send(_message(PROC_CN_MCAST_LISTEN))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._read, name="bench-procevents", daemon=True)
        self._thread.start()
        return self

    def watch(self, pid: int) -> None:
        """Keep the execs of children that `pid` (a daemon's tgid) forks from now on."""
        with self._lock:
            self._parents.add(pid)

    def execs(self) -> list[Exec]:
        """The first exec of each watched child, oldest first."""
        with self._lock:
            return list(self._execs)

    def first_exec_after(self, at: float) -> Exec | None:
        return next((e for e in self.execs() if e.at >= at), None)

    def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.2)
            if not ready:
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                continue  # ENOBUFS after a burst of events elsewhere: later ones still count
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length = _NLMSGHDR.unpack_from(data, offset)[0]
            if length < _NLMSGHDR.size:
                return
            body = offset + _NLMSGHDR.size + _CN_MSG.size
            if body + _EVENT.size <= len(data):
                what, _cpu, stamp = _EVENT.unpack_from(data, body)
                rest = body + _EVENT.size
                if what == PROC_EVENT_FORK and rest + _FORK.size <= len(data):
                    _ppid, parent, child, child_tgid = _FORK.unpack_from(data, rest)
                    with self._lock:
                        if parent in self._parents and child == child_tgid:
                            self._children.add(child)
                elif what == PROC_EVENT_EXEC and rest + _EXEC.size <= len(data):
                    _pid, tgid = _EXEC.unpack_from(data, rest)
                    with self._lock:
                        if tgid in self._children:
                            self._children.discard(tgid)  # the first exec only (/bin/sh, not ip)
                            self._execs.append(Exec(tgid, (stamp + self._offset) / 1e9))
            offset += (length + 3) & ~3

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(_message(PROC_CN_MCAST_IGNORE))
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ProcEvents:
        return self.open()

    def __exit__(self, *_exc: object) -> None:
        self.close()
