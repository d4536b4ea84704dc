"""The other end of a log socket: a Unix datagram socket whose datagrams a thread hands on.

`portsentry demo` points the daemon's syslog at one; the system tests and the bench do the same,
and stand one in for systemd's $NOTIFY_SOCKET. The thread (`name`) owns the socket and only
receives: it passes each datagram, with the kernel's receive stamp when SO_TIMESTAMPNS is on (or
the time it was read), to `handle`, which must be quick, so the daemon never blocks on a full
socket while the reader is busy.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")  # struct timespec: tv_sec, tv_nsec
POLL = 0.1  # seconds between checks of close() while nothing arrives

Handler = Callable[[bytes, float], None]


def bind_datagram(path: Path | str) -> socket.socket:
    """A Unix datagram socket bound at `path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    return sock


class DatagramReceiver:
    """Receives on `sock` (or a socket it binds at a path) until close(); see the module docstring."""

    def __init__(self, sock: socket.socket | Path | str, handle: Handler, name: str = "receiver",
                 unlink: bool = False) -> None:
        self._sock = sock if isinstance(sock, socket.socket) else bind_datagram(sock)
        self._path = None if isinstance(sock, socket.socket) or not unlink else os.fspath(sock)
        self._sock.settimeout(POLL)
        self._handle = handle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        space = socket.CMSG_SPACE(_TIMESPEC.size)
        while not self._stop.is_set():
            try:
                data, ancillary, _flags, _address = self._sock.recvmsg(65536, space)
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.time()
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                    seconds, nanoseconds = _TIMESPEC.unpack_from(payload)
                    at = seconds + nanoseconds / 1e9
            self._handle(data, at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._sock.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
