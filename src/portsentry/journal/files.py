"""The history file and the per-mode blocked files, in 1.2's line format.

fail2ban's stock portsentry filter reads the history file with
`\\/<HOST> Port\\: [0-9]+ (TCP|UDP) Blocked$` and an epoch at the start of the line, so the line
format is a contract.
"""

from __future__ import annotations

import fcntl
import os
import time

from portsentry.core.probe import IPAddress, Protocol
from portsentry.journal.fileio import append_record


def history_line(at: float, name: str, address: IPAddress, port: int, protocol: Protocol) -> str:
    t = time.localtime(at)
    return (
        f"{int(at)} - {t.tm_mon:02d}/{t.tm_mday:02d}/{t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} "
        f"Host: {name}/{address} Port: {port} {protocol} Blocked"
    )


def append_line(path: str, line: str) -> None:
    """One O_APPEND write per line, so concurrent readers such as fail2ban never see half a line;
    a failed or short write is rolled back (under a flock, so another writer's line is not cut)
    and raises OSError. A file whose last line was left unterminated (1.2 killed or out of disk
    mid-line) gets its newline first: joined to that line, ours would carry its old epoch, and
    fail2ban would take the scan for one years past."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    flags = os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd, readable = os.open(path, os.O_RDWR | flags, 0o600), True
    except PermissionError:  # write-only to us (the unit drops CAP_DAC_OVERRIDE): append blind
        fd, readable = os.open(path, os.O_WRONLY | flags, 0o600), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size if readable else 0
        separator = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        append_record(fd, separator + (line + "\n").encode("utf-8", "replace"))
    finally:
        os.close(fd)


def truncate(path: str, lines: bytes = b"") -> None:
    """1.2 starts every session with an empty blocked file; a reload that moves it starts the
    new one with the session's `lines`."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if lines:
            append_record(fd, lines)
    finally:
        os.close(fd)
