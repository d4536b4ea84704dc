"""A minimal syslog client that writes 1.2's framing (ident `portsentry`, LOG_PID, facility daemon).

We write to the log socket ourselves instead of using the stdlib `syslog` module so the socket path
is configurable: tests point it at a receiver of their own, never at the machine's /dev/log.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from portsentry.journal.logsend import CLOSE_GRACE as CLOSE_GRACE
from portsentry.journal.logsend import HeldWriter, Sender

LOG_DAEMON = 3
LOG_ERR = 3
LOG_NOTICE = 5
LOG_INFO = 6
DEFAULT_SOCKET = "/dev/log"


_last_stamp: tuple[int, str] = (-1, "")  # (second, its text): a burst of lines formats it once


def _stamp(at: float) -> str:
    global _last_stamp
    second = int(at)
    cached_second, text = _last_stamp
    if second != cached_second:
        text = time.strftime("%b %e %H:%M:%S", time.localtime(second))
        _last_stamp = (second, text)  # one tuple: a racing thread sees the old pair or the new
    return text


def frame(message: str, severity: int, ident: str, pid: int, at: float) -> bytes:
    """RFC 3164 as glibc's syslog(3) writes it; the local syslog daemon adds the host name."""
    stamp = _stamp(at)
    return f"<{LOG_DAEMON * 8 + severity}>{stamp} {ident}[{pid}]: {message}".encode(
        "utf-8", "replace"
    )


class SyslogWriter(HeldWriter):
    """Sends one datagram per message; reconnects after errors and never raises or waits: lines
    the daemon does not read yet are held (journal.logsend)."""

    def __init__(self, path: str = DEFAULT_SOCKET, ident: str = "portsentry") -> None:
        super().__init__()
        self.path = path
        self.ident = ident
        # Read once: `socket.type` converts to an enum on every access, a microsecond a line.
        self._stream = False

    def _connect(self) -> socket.socket:
        failure = OSError(f"no syslog socket at {self.path}")
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(socket.AF_UNIX, kind)
            try:
                sock.connect(self.path)
            except OSError as error:
                sock.close()
                failure = error  # the stream attempt's: ENOENT, ECONNREFUSED say what is wrong
                continue
            return sock
        raise failure

    def emit(self, message: str, severity: int, fields: Mapping[str, object]) -> bool:
        """The Journal's call: structured `fields` (journald's) have no place in a syslog line."""
        return self.send(message, severity)

    def send(self, message: str, severity: int = LOG_NOTICE, at: float | None = None) -> bool:
        return self._deliver(frame(message, severity, self.ident, os.getpid(),
                                   time.time() if at is None else at))

    def _framed(self, data: bytes) -> bytes:
        return data + b"\0" if self._stream else data

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = self._connect()
            self._stream = self._sock.type == socket.SOCK_STREAM
            self.failures += self._held.reconnected()
        return self._sock

    def _sender(self, sock: socket.socket) -> Sender:
        return lambda data: sock.send(data, socket.MSG_DONTWAIT)
