"""Syslog framing is 1.2's (ident portsentry, LOG_PID, facility daemon) and delivery never raises."""

from __future__ import annotations

import os
import socket

from portsentry.journal.syslog import LOG_INFO, LOG_NOTICE, SyslogWriter, frame


def test_frame_is_rfc3164_with_daemon_facility_and_pid():
    data = frame("attackalert: x", LOG_NOTICE, "portsentry", 42, 0.0).decode()
    assert data.startswith("<29>")
    assert data.endswith(" portsentry[42]: attackalert: x")
    assert frame("m", LOG_INFO, "portsentry", 1, 0.0).startswith(b"<30>")


def test_writer_delivers_to_a_datagram_socket(tmp_path):
    path = str(tmp_path / "log")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2)
    writer = SyslogWriter(path)
    assert writer.send("adminalert: hello")
    assert receiver.recv(4096).decode().endswith(f"portsentry[{os.getpid()}]: adminalert: hello")
    receiver.close()
    writer.close()


def test_writer_without_a_socket_counts_failures_and_does_not_raise(tmp_path):
    writer = SyslogWriter(str(tmp_path / "missing"))
    assert not writer.send("x")
    assert writer.failures == 1
