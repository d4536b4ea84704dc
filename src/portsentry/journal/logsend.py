"""Lines a log daemon cannot take yet: held in order instead of waiting for it.

A syslog daemon or journald that stops reading (stopped, hung, swamped) lets its socket's queue
fill, and a blocking send then waits until it reads again: the packet loop, which writes every
detection line, stopped detecting and blocking meanwhile (glibc's syslog(3), and so 1.2, wait
the same way). The writers send without waiting; what the socket will not take is held here,
up to HOLD_LIMIT lines, and goes out first at the next line or at the daemon's once-a-second
flush, so the log keeps its order. Past the limit a line is refused and the Journal counts it
as lost, which `status`, the metrics and the failure summary report.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable

HOLD_LIMIT = 10_000  # lines; about 3 MB of detection lines
CLOSE_GRACE = 1.0  # seconds held lines may take to go out when the daemon stops
BUSY = "the log daemon is not reading its socket"

# Sends bytes without waiting: how many it took (a stream may take part of a line), or raises
# BlockingIOError when the socket takes nothing now, OSError when it is unusable.
Sender = Callable[[bytes], int]


class Held:
    """Not thread-safe: the writer's caller (Journal) holds its lock around every call."""

    def __init__(self, limit: int = HOLD_LIMIT) -> None:
        self.limit = limit
        self._lines: deque[bytes] = deque()
        self._cut = False  # the first held item is the rest of a line a stream took part of

    def __len__(self) -> int:
        return len(self._lines)

    def send(self, data: bytes, sender: Sender) -> bool:
        """Send `data` after what is held, or hold it; False when it had to be dropped. OSError
        other than "would block" is the caller's (it reconnects; what is held stays)."""
        if self._lines and not self.flush(sender):
            return self._hold(data)
        try:
            taken = sender(data)
        except BlockingIOError:
            return self._hold(data)
        if taken < len(data):
            self._lines.append(data[taken:])  # nothing else is held: it goes first
            self._cut = True
        return True

    def flush(self, sender: Sender) -> bool:
        """Send what is held, in order, while the socket takes it; True when nothing is left."""
        while self._lines:
            head = self._lines[0]
            try:
                taken = sender(head)
            except BlockingIOError:
                return False
            if taken < len(head):
                self._lines[0] = head[taken:]
                self._cut = True
                return False
            self._lines.popleft()
            self._cut = False
        return True

    def reconnected(self) -> int:
        """A stream's new connection must not get the rest of a line cut part-way on the old
        one (garbage to the daemon): that rest is dropped. How many lines went (0 or 1)."""
        if not self._cut:
            return 0
        self._lines.popleft()
        self._cut = False
        return 1

    def _hold(self, data: bytes) -> bool:
        if len(self._lines) >= self.limit:
            return False
        self._lines.append(data)
        return True


class HeldWriter:
    """What the syslog and journald writers share: send through Held, reconnect once after an
    error, count what is lost, flush on the tick, give held lines a second at the end. A writer
    says how to get its socket (`_socket`) and how to send on it without waiting (`_sender`)."""

    path: str
    unit = "lines"  # what the failure report calls what is held

    def __init__(self) -> None:
        self.failures = 0
        self.last_error = ""  # why the last line could not be sent, for the failure report
        self._sock: socket.socket | None = None
        self._held = Held()

    def _socket(self) -> socket.socket:
        raise NotImplementedError

    def _sender(self, sock: socket.socket) -> Sender:
        raise NotImplementedError

    def _framed(self, data: bytes) -> bytes:
        """`data` as it goes on the socket just opened (a stream's lines end in NUL)."""
        return data

    def _deliver(self, data: bytes) -> bool:
        for _attempt in range(2):
            try:
                sock = self._socket()
                if self._held.send(self._framed(data), self._sender(sock)):
                    return True
                self.last_error = f"{BUSY}: {len(self._held)} {self.unit} held"
                break
            except OSError as error:
                self.last_error = error.strerror or str(error)
                self._disconnect()
        self.failures += 1
        return False

    def flush(self) -> bool:
        """Send what is held while the socket takes it (the daemon's tick); True when none is left."""
        if not len(self._held):
            return True
        try:
            return self._held.flush(self._sender(self._socket()))
        except OSError as error:
            self.last_error = error.strerror or str(error)
            self._disconnect()
            return False

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """At the end: what is held gets CLOSE_GRACE to go out."""
        give_up = time.monotonic() + CLOSE_GRACE
        while not self.flush() and time.monotonic() < give_up:
            time.sleep(0.02)
        self._disconnect()
