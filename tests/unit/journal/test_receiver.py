"""The log-socket receiver: every datagram reaches the handler, with the kernel's stamp when asked."""

from __future__ import annotations

import queue
import socket
import time
from pathlib import Path

from portsentry.journal.receiver import SO_TIMESTAMPNS, DatagramReceiver, bind_datagram


def test_every_datagram_reaches_the_handler_in_order(tmp_path: Path) -> None:
    got: queue.Queue[tuple[bytes, float]] = queue.Queue()
    path = tmp_path / "log"
    receiver = DatagramReceiver(path, lambda data, at: got.put((data, at)), unlink=True)
    before = time.time()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        for n in range(50):
            sender.sendto(b"line %d" % n, str(path))
    lines = [got.get(timeout=5) for _ in range(50)]
    receiver.close()
    assert [data for data, _ in lines] == [b"line %d" % n for n in range(50)]
    assert all(before - 1 <= at <= time.time() + 1 for _, at in lines)
    assert not path.exists()


def test_the_kernel_stamp_is_the_time_of_sending_not_of_reading(tmp_path: Path) -> None:
    sock = bind_datagram(tmp_path / "log")
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"early", str(tmp_path / "log"))
        sent = time.time()
        time.sleep(0.3)  # the datagram waits in the queue before anyone reads it
        got: queue.Queue[float] = queue.Queue()
        receiver = DatagramReceiver(sock, lambda _data, at: got.put(at))
        at = got.get(timeout=5)
        receiver.close()
    assert abs(at - sent) < 0.2
