"""Where lines go: syslog or the journal (with fields), stderr, recent events for status."""

from __future__ import annotations

import io
import socket

from portsentry.journal.journal import Journal
from portsentry.journal.journald import JournaldWriter


def test_journal_entries_carry_the_probe_fields(tmp_path):
    path = str(tmp_path / "journal.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2)
    stderr = io.StringIO()
    journal = Journal(JournaldWriter(path=path), stderr=stderr)
    journal.log("attackalert: Connect from host: a/198.18.0.2 to TCP port: 1",
                fields={"PORTSENTRY_SRC": "198.18.0.2", "PORTSENTRY_PORT": 1})
    entry = receiver.recv(65536).decode()
    assert "MESSAGE=attackalert: Connect from host: a/198.18.0.2 to TCP port: 1\n" in entry
    assert "PORTSENTRY_SRC=198.18.0.2\n" in entry and "PORTSENTRY_PORT=1\n" in entry
    assert "SYSLOG_IDENTIFIER=portsentry\n" in entry
    assert stderr.getvalue() == "attackalert: Connect from host: a/198.18.0.2 to TCP port: 1\n"
    assert [e["message"] for e in journal.recent_events()] == [
        "attackalert: Connect from host: a/198.18.0.2 to TCP port: 1"]
    receiver.close()


def test_verbose_lines_only_with_verbose_and_never_in_recent_events():
    stderr = io.StringIO()
    quiet = Journal(None, stderr=stderr)
    quiet.log("attackalert: Host: 127.0.0.1 found in ignore file, aborting actions", verbose=True)
    assert stderr.getvalue() == ""
    loud = Journal(None, stderr=stderr, verbose=True)
    loud.log("attackalert: Host: 127.0.0.1 found in ignore file, aborting actions", verbose=True)
    assert "found in ignore file" in stderr.getvalue()
    assert loud.recent_events() == []
