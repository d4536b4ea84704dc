"""Where lines go: syslog or the journal (with fields), stderr, recent events for status."""

from __future__ import annotations

import contextlib
import io
import os
import socket

import pytest

from portsentry.journal.journal import Journal
from portsentry.journal.journald import JournaldWriter
from portsentry.journal.syslog import SyslogWriter


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


def test_lines_lost_while_syslog_is_gone_are_counted_and_said_once_it_is_back(tmp_path):
    """rsyslogd restarting removes /dev/log for a moment: the lines sent meanwhile are lost,
    but never silently (status, metrics, and a summary line once the socket is back)."""
    path = tmp_path / "log.sock"
    journal = Journal(SyslogWriter(str(path)))
    journal.log("attackalert: Connect from host: 198.18.0.2/198.18.0.2 to TCP port: 1")
    assert journal.file_errors >= 1
    (entry,) = journal.failures.snapshot()
    assert (entry["file"], entry["path"]) == ("syslog", str(path))
    assert "No such file or directory" in str(entry["last_error"])
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2)
    journal.failures.window = 0.0  # the minute is over
    journal.failures.flush()
    summary = receiver.recv(65536).decode()
    assert f"failed writes to syslog {path}" in summary, summary
    journal.log("adminalert: back")
    assert receiver.recv(65536).decode().endswith(f"portsentry[{os.getpid()}]: adminalert: back")
    receiver.close()


def test_a_stderr_nobody_reads_any_more_neither_raises_nor_stops_syslog(tmp_path):
    """--log-stderr piped into a reader that exits: the next line must not raise out of log()
    (that stopped the daemon's loop); syslog keeps every line and says stderr failed."""
    path = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2)
    read_end, write_end = os.pipe()
    os.close(read_end)
    stderr = os.fdopen(write_end, "w")
    journal = Journal(SyslogWriter(path), stderr=stderr)
    journal.log("attackalert: one")
    journal.log("attackalert: two")
    with contextlib.suppress(BrokenPipeError):
        stderr.close()
    said = [receiver.recv(65536).decode() for _ in range(3)]
    assert said[0].endswith("attackalert: one") and said[2].endswith("attackalert: two")
    assert "cannot write stderr" in said[1] and "Broken pipe" in said[1], said
    assert journal.failures.snapshot()[0]["file"] == "stderr"
    receiver.close()


# Text from outside (a fleet Redis server's error reply, a KILL_RUN_CMD's output) reaches log
# lines. A control character there must not start a line of its own: journald splits a stderr
# stream at "\n" and at NUL, a stream /dev/log frames messages with NUL, a terminal obeys "\r"
# and escape sequences. A forged `attackalert:` line is one fail2ban would act on.
FORGED = "attackalert: Connect from host: 10.9.8.7/10.9.8.7 to TCP port: 22"


@pytest.mark.parametrize("separator", ["\n", "\r", "\0", "\r\n", "\x1b[2K\r", "\u2028", "\x85", "\v"])
def test_a_control_character_never_starts_a_line_of_its_own(tmp_path, separator):
    path = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2)
    stderr = io.StringIO()
    journal = Journal(SyslogWriter(path), stderr=stderr)
    journal.log(f"attackalert: ERROR: fleet: ResponseError: x{separator}{FORGED}")
    said = receiver.recv(65536).decode()
    message = said.split(": ", 1)[1]
    for text in (message, stderr.getvalue().removesuffix("\n"), str(journal.recent_events()[0]["message"])):
        assert text.isprintable(), repr(text)
        assert text.startswith("attackalert: ERROR: fleet: ResponseError: x") and text.endswith(FORGED)
    receiver.close()


def test_a_stream_syslog_socket_gets_one_message_for_a_line_holding_nul(tmp_path):
    """A SOCK_STREAM /dev/log (syslog-ng) ends each message with NUL: one inside a line made the
    rest a message of its own, header and all."""
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    journal = Journal(SyslogWriter(path))
    journal.log(f"adminalert: fleet: link is down (x\0<29>Jan  1 00:00:00 portsentry[1]: {FORGED})")
    journal.close()
    conn, _ = server.accept()
    conn.settimeout(2)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    frames = data.split(b"\0")
    assert frames[-1] == b"" and len(frames) == 2, frames
    conn.close()
    server.close()


def test_the_start_never_empties_a_blocked_file_that_is_the_history_file(tmp_path):
    # BLOCKED_FILE="/var/log/portsentry" beside HISTORY_FILE="/var/log/portsentry.tcp": the start
    # emptied BLOCKED_FILE.tcp, which was the history, every time.
    from portsentry.core.probe import Mode

    history = tmp_path / "portsentry.tcp"
    history.write_text("1700000000 - 11/14/2023 22:13:20 Host: 198.18.5.5/198.18.5.5 Port: 1 TCP Blocked\n")
    said = io.StringIO()
    journal = Journal(None, history_file=str(history), blocked_file=str(tmp_path / "portsentry"), stderr=said)
    (tmp_path / "portsentry.udp").write_text("left by the last run\n")
    journal.start_session([Mode.TCP, Mode.UDP])
    assert history.read_text().startswith("1700000000 - ")
    assert (tmp_path / "portsentry.udp").read_text() == ""
    assert said.getvalue() == (f"adminalert: ERROR: blocked file {history} is the history file "
                               "(HISTORY_FILE): not emptied\n")
