"""The history line must stay readable by fail2ban's stock portsentry filter."""

from __future__ import annotations

import re
import time
from ipaddress import ip_address

from portsentry.journal.files import append_line, history_line, truncate
from portsentry.probe import Protocol

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
