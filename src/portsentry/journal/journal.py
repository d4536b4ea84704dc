"""Where every line goes: syslog, optionally stderr, and the history and blocked files."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Protocol, TextIO

from portsentry.core.probe import Mode, Probe
from portsentry.journal.failures import BLOCKED, HISTORY, STDERR, SYSLOG, WriteFailures
from portsentry.journal.files import append_line, history_line, truncate
from portsentry.journal.syslog import LOG_INFO, LOG_NOTICE


def one_line(text: str) -> str:
    """`text` with every character that is not printable (newline, CR, NUL, escape sequences,
    Unicode line separators, bidi controls) written as its Python escape (`\\n`, `\\x1b`).

    Log lines carry text from outside (a fleet Redis server's error reply, a KILL_RUN_CMD's
    output), and each sink ends a line at some control character: journald's stderr stream at
    newline and NUL, a stream /dev/log at NUL, a terminal overwrites at CR. Every line of ours is
    printable, so this changes none of the classic formats; isprintable() is a C loop, cheap
    enough for every line of a flood.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class LogWriter(Protocol):
    """Syslog or the systemd journal: one message with a syslog severity."""

    path: str
    last_error: str  # why the last `emit` returned False

    def emit(self, message: str, severity: int, fields: Mapping[str, object]) -> bool:
        """One message; `fields` (PORTSENTRY_SRC etc.) are kept where the sink can (journald)."""
        ...

    def flush(self) -> bool:
        """Send what the sink held while its daemon was not reading; True when nothing is left."""
        ...

    def close(self) -> None: ...


class Journal:
    """Thread-safe: responders log from worker threads while the main loop logs detections."""

    def __init__(
        self,
        syslog: LogWriter | None,
        history_file: str | None = None,
        blocked_file: str | None = None,
        stderr: TextIO | None = None,
        verbose: bool = False,
    ) -> None:
        self.syslog = syslog
        self.history_file = history_file
        self.blocked_file = blocked_file
        self.stderr = stderr
        self.verbose = verbose
        # Every failed record write of the daemon is reported here (responders and the ban
        # lifecycle are handed the same object).
        self.failures = WriteFailures(self.log)
        self._lock = threading.RLock()  # re-entered by `in_order`
        self._recent: deque[tuple[float, str]] = deque(maxlen=10)

    def log(self, text: str, verbose: bool = False, fields: dict[str, object] | None = None,
            sent: bool = False) -> None:
        """One line; `fields` (PORTSENTRY_SRC etc.) reach the systemd journal when that is the sink.
        `sent`: the fast lane has written it to syslog already (every other sink still gets it)."""
        if verbose and not self.verbose:
            return
        text = one_line(text)
        with self._lock:
            if text.startswith("attackalert:") and not verbose:
                self._recent.append((time.time(), text))
            severity = LOG_INFO if verbose else LOG_NOTICE
            # A sink that fails must neither raise (every caller, the packet loop included,
            # logs) nor lose lines unnoticed: each lost line is a failed write, counted for
            # status and the metrics and summed up in the log (WriteFailures), whose own lines
            # come back here; a second failure inside its window is only counted, so this ends.
            if not sent and self.syslog is not None and not self.syslog.emit(text, severity, fields or {}):
                self.failures.failed(SYSLOG, self.syslog.path, self.syslog.last_error)
            if self.stderr is not None:
                try:
                    print(text, file=self.stderr, flush=True)
                except (OSError, ValueError) as error:  # ValueError: the file was closed
                    if isinstance(error, BrokenPipeError):
                        self.stderr = None  # its reader is gone for good: said once, below
                    detail = error.strerror if isinstance(error, OSError) else None
                    self.failures.failed(STDERR, "stderr", detail or str(error))

    def flush(self) -> None:
        """Once a second (the daemon's tick): lines the log daemon did not take yet go out."""
        if self.syslog is not None:
            with self._lock:
                self.syslog.flush()

    @contextlib.contextmanager
    def in_order(self) -> Iterator[None]:
        """Lines other threads log wait until the caller's lines inside are written (a block's
        worker starts before the detection line is written; its lines must still follow it)."""
        with self._lock:
            yield

    def recent_events(self) -> list[dict[str, object]]:
        """The last ten attackalert lines, for `portsentry status`."""
        with self._lock:
            return [{"at": at, "message": text} for at, text in self._recent]

    def blocked_path(self, mode: Mode) -> str | None:
        return f"{self.blocked_file}.{mode}" if self.blocked_file else None

    def start_session(self, modes: list[Mode]) -> None:
        for mode in modes:
            self._start_blocked(self.blocked_path(mode), b"")

    def move_blocked_file(self, blocked_file: str | None, modes: list[Mode]) -> None:
        """A reload's new BLOCKED_FILE starts as the start makes it, 1.2's list of this session's
        blocked hosts: emptied of what an earlier run left, then given this session's lines from
        the old file, which stays as it was."""
        if blocked_file == self.blocked_file:
            return
        carried: dict[Mode, bytes] = {}
        for mode in modes:
            old = self.blocked_path(mode)
            try:
                with open(old or os.devnull, "rb") as handle:
                    carried[mode] = handle.read()
            except OSError:
                carried[mode] = b""  # gone or unreadable: this session's lines are in the history
        with self._lock:
            self.blocked_file = blocked_file
            for mode in modes:
                self._start_blocked(self.blocked_path(mode), carried[mode])

    def _start_blocked(self, path: str | None, lines: bytes) -> None:
        if not path:
            return
        if self.history_file and _same_file(path, self.history_file):
            # BLOCKED_FILE="x" beside HISTORY_FILE="x.tcp": emptying it would lose the history.
            self.log(f"adminalert: ERROR: blocked file {path} is the history file (HISTORY_FILE): "
                     "not emptied")
            return
        try:
            truncate(path, lines)
        except OSError as error:
            self.failures.failed(BLOCKED, path, error.strerror or str(error))

    def record(self, probe: Probe, at: float) -> None:
        line = history_line(at, probe.name, probe.source, probe.port, probe.mode.protocol)
        for kind, path in ((HISTORY, self.history_file), (BLOCKED, self.blocked_path(probe.mode))):
            if not path:
                continue
            try:
                append_line(path, line)
            except OSError as error:
                self.failures.failed(kind, path, error.strerror or str(error))

    @property
    def file_errors(self) -> int:
        return self.failures.total

    def close(self) -> None:
        self.failures.close()
        if self.syslog is not None:
            self.syslog.close()



def _same_file(one: str, other: str) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:  # one of them does not exist yet
        return os.path.abspath(one) == os.path.abspath(other)
