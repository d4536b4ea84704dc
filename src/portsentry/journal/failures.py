"""Failed writes of records (history, blocked files, hosts.deny, the event log, the ban store):
said in the log, counted for the metrics and listed by `portsentry status`, so evidence that
could not be kept is never lost silently.

A full disk fails every write, so each file gets one line when its trouble starts, then at most
one line a minute with the count of failures since the last line; a window that ends quietly is
summed up by `flush` (the daemon's tick, and shutdown). Thread-safe: responders, the tick and
the packet loop all write records.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from portsentry.core import messages

WINDOW = 60.0

# What a record file is, as the metric label and `status` name it.
HISTORY = "history"
BLOCKED = "blocked"
HOSTS_DENY = "hosts_deny"
EVENT_LOG = "event_log"
BAN_STORE = "ban_store"
SYSLOG = "syslog"  # log lines, not records, but as much evidence: their loss is counted too
STDERR = "stderr"

Logger = Callable[[str], None]
Counter = Callable[[str], None]


@dataclass
class _File:
    kind: str
    path: str
    total: int = 0
    unlogged: int = 0  # failures since the last line
    window_start: float = 0.0
    last_error: str = ""
    last_at: float = 0.0  # wall clock, for status


def first_line(kind: str, path: str, detail: str) -> str:
    """1.2's wording where 1.2 had a message for it."""
    if kind in (HISTORY, BLOCKED):
        return messages.file_error(kind, path, detail)
    if kind == HOSTS_DENY:
        return f"adminalert: cannot open hosts.deny file: {path} for blocking. ({detail})"
    if kind == BAN_STORE:
        return messages.store_failed(detail)
    return f"adminalert: ERROR: cannot write {kind.replace('_', ' ')} {path}: {detail}"


def repeat_line(entry: _File, seconds: float) -> str:
    return (f"adminalert: ERROR: {entry.unlogged} more failed writes to {entry.kind.replace('_', ' ')} "
            f"{entry.path} in the last {int(seconds)} s (last: {entry.last_error})")


class WriteFailures:
    def __init__(self, log: Logger, count: Counter | None = None,
                 clock: Callable[[], float] = time.monotonic, window: float = WINDOW) -> None:
        self._log = log
        self.count: Counter = count or (lambda _kind: None)
        self._clock = clock
        self.window = window
        self._files: dict[tuple[str, str], _File] = {}
        self._lock = threading.Lock()

    def failed(self, kind: str, path: str, detail: str) -> None:
        """One record for `path` could not be written (or was rolled back)."""
        now = self._clock()
        line: str | None = None
        with self._lock:
            entry = self._files.get((kind, path))
            if entry is None:
                entry = self._files[(kind, path)] = _File(kind, path, window_start=now - self.window)
            entry.total += 1
            entry.unlogged += 1
            entry.last_error, entry.last_at = detail, time.time()
            if now - entry.window_start >= self.window:
                line = first_line(kind, path, detail) if entry.unlogged == 1 else repeat_line(
                    entry, now - entry.window_start)
                entry.unlogged, entry.window_start = 0, now
        self.count(kind)
        if line is not None:
            self._log(line)

    def flush(self) -> None:
        """Sum up the failures of windows that have ended without a line of their own."""
        now = self._clock()
        lines: list[str] = []
        with self._lock:
            for entry in self._files.values():
                if entry.unlogged and now - entry.window_start >= self.window:
                    lines.append(repeat_line(entry, now - entry.window_start))
                    entry.unlogged, entry.window_start = 0, now
        for line in lines:
            self._log(line)

    def close(self) -> None:
        """At shutdown: every failure not yet said is said now."""
        with self._lock:
            lines = [repeat_line(e, self._clock() - e.window_start) for e in self._files.values()
                     if e.unlogged]
            for entry in self._files.values():
                entry.unlogged = 0
        for line in lines:
            self._log(line)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(entry.total for entry in self._files.values())

    def snapshot(self) -> list[dict[str, object]]:
        """Per file: how many writes failed since start, and the last error, for `status`."""
        with self._lock:
            return [{"file": e.kind, "path": e.path, "failures": e.total, "last_error": e.last_error,
                     "last_at": e.last_at} for e in self._files.values()]
