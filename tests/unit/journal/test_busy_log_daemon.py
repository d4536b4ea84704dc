"""A log daemon that stops reading (stopped, hung, swamped) must not stall the daemon.

Its socket's queue fills and a blocking send waits for good: the packet loop, which writes every
detection line, stopped detecting and blocking. Lines it cannot take yet are held, in order, up
to HOLD_LIMIT, and go out once it reads again; beyond that they are counted as lost.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from portsentry.journal.journal import Journal
from portsentry.journal.journald import JournaldWriter
from portsentry.journal.logsend import HOLD_LIMIT
from portsentry.journal.syslog import SyslogWriter

Stalled = tuple[Journal, Callable[[], list[bytes]]]


@pytest.fixture(params=["syslog-dgram", "syslog-stream", "journald"])
def stalled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stalled]:
    """A Journal writing to a receiver that reads nothing until the returned drain() is called."""
    path = str(tmp_path / "log")
    kind = socket.SOCK_STREAM if request.param == "syslog-stream" else socket.SOCK_DGRAM
    receiver = socket.socket(socket.AF_UNIX, kind)
    receiver.bind(path)
    accepted: list[socket.socket] = []
    pending = [b""]
    if kind == socket.SOCK_STREAM:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        receiver.listen(1)
    writer = JournaldWriter(path) if request.param == "journald" else SyslogWriter(path)
    journal = Journal(writer)

    def drain() -> list[bytes]:
        if kind == socket.SOCK_STREAM:
            if not accepted:
                accepted.append(receiver.accept()[0])
            conn = accepted[0]
        else:
            conn = receiver
        conn.settimeout(0.2)
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(conn.recv(1 << 20))
            except TimeoutError:
                break
        if kind == socket.SOCK_STREAM:  # lines end in NUL; one may straddle two calls
            *lines, rest = (pending.pop() + b"".join(chunks)).split(b"\0")
            pending.append(rest)
            return [line for line in lines if line]
        return chunks

    yield journal, drain
    journal.close()
    for conn in accepted:
        conn.close()
    receiver.close()


def _log_in_thread(journal: Journal, count: int) -> threading.Thread:
    def run() -> None:
        for n in range(count):
            journal.log(f"attackalert: line {n} " + "x" * 200)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_log_daemon_that_stops_reading_does_not_stall_logging(stalled) -> None:
    journal, drain = stalled
    count = 3000  # far more than a unix socket queues (max_dgram_qlen; 4 KiB for the stream)
    thread = _log_in_thread(journal, count)
    thread.join(10.0)
    assert not thread.is_alive(), "Journal.log blocked on a log daemon that does not read"
    assert journal.failures.total == 0  # held, not lost
    got: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            got.extend(drain())

    reading = threading.Thread(target=read, daemon=True)
    reading.start()  # the log daemon reads again; the daemon's tick flushes meanwhile
    give_up = time.monotonic() + 20
    while time.monotonic() < give_up and sum(b"attackalert: line " in line for line in got) < count:
        journal.flush()
        time.sleep(0.01)
    done.set()
    reading.join(5)
    texts = [line for line in got if b"attackalert: line " in line]
    numbers = [int(line.split(b"attackalert: line ")[1].split()[0]) for line in texts]
    assert numbers == list(range(count)), "held lines lost or out of order"


def test_beyond_the_hold_limit_lines_are_counted_as_lost(stalled) -> None:
    journal, _drain = stalled
    thread = _log_in_thread(journal, HOLD_LIMIT + 2000)
    thread.join(30.0)
    assert not thread.is_alive()
    # What the socket's queue took (a few hundred lines) is not lost; the rest past the limit is.
    assert 1000 <= journal.failures.total <= 2000
