"""Failed record writes are said (once a minute per file, with a count), counted and listed (issue 9.5)."""

from __future__ import annotations

from portsentry.journal.failures import BAN_STORE, EVENT_LOG, HISTORY, HOSTS_DENY, WriteFailures


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failures() -> tuple[WriteFailures, list[str], list[str], Clock]:
    lines: list[str] = []
    counted: list[str] = []
    clock = Clock()
    return WriteFailures(lines.append, counted.append, clock=clock), lines, counted, clock


def test_first_failure_is_said_in_1_2_words_then_once_a_minute_with_a_count():
    tracker, lines, counted, clock = failures()
    tracker.failed(HISTORY, "/var/lib/portsentry/portsentry.history", "No space left on device")
    assert lines == ["adminalert: ERROR: Cannot open history file: /var/lib/portsentry/portsentry.history. "
                     "(No space left on device)"]
    for _ in range(99):
        clock.now += 0.5
        tracker.failed(HISTORY, "/var/lib/portsentry/portsentry.history", "No space left on device")
    assert len(lines) == 1 and len(counted) == 100
    clock.now += 11
    tracker.failed(HISTORY, "/var/lib/portsentry/portsentry.history", "No space left on device")
    assert lines[1] == ("adminalert: ERROR: 100 more failed writes to history "
                        "/var/lib/portsentry/portsentry.history in the last 60 s "
                        "(last: No space left on device)")


def test_files_are_limited_separately_and_windows_are_summed_up_when_they_end():
    tracker, lines, _counted, clock = failures()
    tracker.failed(HOSTS_DENY, "/etc/hosts.deny", "Read-only file system")
    tracker.failed(EVENT_LOG, "/var/log/ps.json", "No space left on device")
    tracker.failed(EVENT_LOG, "/var/log/ps.json", "No space left on device")
    assert lines == ["adminalert: cannot open hosts.deny file: /etc/hosts.deny for blocking. "
                     "(Read-only file system)",
                     "adminalert: ERROR: cannot write event log /var/log/ps.json: No space left on device"]
    tracker.flush()
    assert len(lines) == 2  # the window has not ended
    clock.now += 60
    tracker.flush()
    assert lines[2].startswith("adminalert: ERROR: 1 more failed writes to event log /var/log/ps.json")
    tracker.flush()
    assert len(lines) == 3


def test_close_says_everything_not_yet_said():
    tracker, lines, _counted, _clock = failures()
    tracker.failed(BAN_STORE, "/var/lib/portsentry/bans.sqlite3", "disk I/O error")
    tracker.failed(BAN_STORE, "/var/lib/portsentry/bans.sqlite3", "disk I/O error")
    tracker.close()
    assert lines[0] == "adminalert: ERROR: ban store: disk I/O error"
    assert lines[1].startswith("adminalert: ERROR: 1 more failed writes to ban store")


def test_snapshot_for_status():
    tracker, _lines, _counted, _clock = failures()
    tracker.failed(HISTORY, "/h", "x")
    tracker.failed(HISTORY, "/h", "y")
    [entry] = tracker.snapshot()
    assert (entry["file"], entry["path"], entry["failures"], entry["last_error"]) == (HISTORY, "/h", 2, "y")
    assert tracker.total == 2
