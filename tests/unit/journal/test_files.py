"""The history line must stay readable by fail2ban's stock portsentry filter."""

from __future__ import annotations

import re
import time
from ipaddress import ip_address

from portsentry.core.probe import Protocol
from portsentry.journal.files import append_line, history_line, truncate

# fail2ban 1.0.2 filter.d/portsentry.conf: failregex `\/<HOST> Port\: [0-9]+ (TCP|UDP) Blocked$`
# with datepattern `{^LN-BEG}Epoch`; <HOST> narrowed here to address characters.
FAIL2BAN = re.compile(r"^(?P<epoch>\d{9,11}) .*\/(?P<host>[0-9a-fA-F.:]+) Port\: [0-9]+ (TCP|UDP) Blocked$")


def test_history_line_matches_1_2_format_and_fail2ban():
    at = 1403884279.7
    line = history_line(at, "198.18.0.2", ip_address("198.18.0.2"), 1, Protocol.TCP)
    t = time.localtime(at)
    assert line == (f"1403884279 - {t.tm_mon:02d}/{t.tm_mday:02d}/{t.tm_year} "
                    f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} "
                    "Host: 198.18.0.2/198.18.0.2 Port: 1 TCP Blocked")
    match = FAIL2BAN.match(line)
    assert match and match["host"] == "198.18.0.2" and match["epoch"] == "1403884279"


def test_history_line_with_a_resolved_name_and_ipv6():
    line = history_line(1.7e9, "scanner.example", ip_address("fd00::2"), 161, Protocol.UDP)
    assert line.endswith("Host: scanner.example/fd00::2 Port: 161 UDP Blocked")
    match = FAIL2BAN.match(line)
    assert match and match["host"] == "fd00::2"


def test_append_creates_directories_and_truncate_empties(tmp_path):
    path = tmp_path / "sub" / "history"
    append_line(str(path), "one")
    append_line(str(path), "two")
    assert path.read_text() == "one\ntwo\n"
    truncate(str(path))
    assert path.read_text() == ""


def test_a_short_append_is_rolled_back_and_raises(tmp_path, monkeypatch):
    # issue 9.4: a full disk after a few bytes must not leave half a history line for fail2ban.
    import os

    import pytest

    from portsentry.journal.files import append_line

    path = tmp_path / "portsentry.history"
    path.write_text("1 - earlier line\n")
    real = os.write
    monkeypatch.setattr("os.write", lambda fd, data: real(fd, bytes(data)[:9]))
    with pytest.raises(OSError, match="short write"):
        append_line(str(path), "1700000000 - 11/14/2023 22:13:20 Host: x/198.18.0.2 Port: 1 TCP Blocked")
    monkeypatch.undo()
    assert path.read_text() == "1 - earlier line\n"


def test_failed_history_writes_are_reported_not_silent(tmp_path):
    # issue 9.5: the history file cannot be opened (its directory cannot exist): say so, count it.
    import io
    from ipaddress import ip_address

    from portsentry.core.probe import Mode, Probe
    from portsentry.journal.journal import Journal

    said = io.StringIO()
    (tmp_path / "file").write_text("")
    journal = Journal(None, history_file=str(tmp_path / "file" / "sub" / "history"), stderr=said)
    for _ in range(3):
        journal.record(Probe(ip_address("198.18.0.2"), 1, Mode.TCP, "Connect"), 0.0)
    assert said.getvalue().splitlines() == [
        f"adminalert: ERROR: Cannot open history file: {tmp_path}/file/sub/history. (Not a directory)"]
    assert journal.file_errors == 3
    assert journal.failures.snapshot()[0]["failures"] == 3


def test_a_history_left_mid_line_does_not_swallow_the_next_line(tmp_path):
    # 1.2 (or a crash, a full disk) left the history's last line cut short, without its newline.
    # Appended to it, our line joined it: fail2ban took the cut line's old epoch for its time
    # and ignored the first scanner after the switch as years past its findtime.
    path = tmp_path / "portsentry.history"
    path.write_bytes(b"1614888019 - 03/04/2021 20:00:19 Host: 198.18.7.1/198.18.7.1 Port: 1 TCP Blocked\n"
                     b"1614888019 - 03/04/2021 20:00:19 Host: 1")
    line = history_line(1796543503, "198.18.0.2", ip_address("198.18.0.2"), 111, Protocol.TCP)
    append_line(str(path), line)
    append_line(str(path), line)
    lines = path.read_text().split("\n")
    assert lines[1] == "1614888019 - 03/04/2021 20:00:19 Host: 1"  # kept as it was, on its own
    assert lines[2:] == [line, line, ""]
    match = FAIL2BAN.match(lines[2])
    assert match and match["epoch"] == "1796543503" and match["host"] == "198.18.0.2"
