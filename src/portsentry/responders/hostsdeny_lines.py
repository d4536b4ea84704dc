"""hosts.deny as bytes and lines, for HostsDeny (and tidy): our line's bytes, splitting on "\n"
only, tcpd's backslash-newline continuation, reading a whole file by descriptor, and what an
append must begin with. Runs in the caller's thread, under HostsDeny's locks."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

_TRAILING = b" \t\r"


def _encode_line(line: str) -> bytes:
    """The bytes of one hosts.deny line without its newline; rejects text that is not one line."""
    if any(c in line for c in "\n\r\0"):
        raise ValueError(f"hosts.deny entry must be a single line without NUL: {line!r}")
    data = line.encode("utf-8", errors="surrogateescape").rstrip(_TRAILING)
    if not data:
        raise ValueError("hosts.deny entry is empty")
    return data


def _split(content: bytes) -> list[bytes]:
    """Lines with their "\\n" (the last may lack it); only "\\n" ends a line, as in hosts.deny."""
    parts = content.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _same(raw_line: bytes, wanted: bytes) -> bool:
    return raw_line.rstrip(b"\n").rstrip(_TRAILING) == wanted


def _heads(lines: list[bytes]) -> Iterator[tuple[int, bytes]]:
    """(index, line) of the lines tcpd reads as the start of a rule. It joins a line after one
    ending in backslash-newline to that one (tcpd's xgets): a copy of our line there is not ours."""
    return ((i, raw) for i, raw in enumerate(lines) if i == 0 or not lines[i - 1].endswith(b"\\\n"))


def _read_all(fd: int, offset: int = 0) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


_SETTLE, _SETTLE_TRIES = 0.001, 20  # an unterminated end must hold still this long to count

def _needs_newline(fd: int) -> bool:
    """Whether an append must begin with "\n": the file's last line is unterminated. Looked at
    right before writing, as a lockless appender may have added to the file since our read. Its
    write can be seen half done for a moment (the kernel extends the size page by page, so a
    line written across a 4 KiB boundary shows without its "\n"), so an unterminated end is
    only believed once the size has held still; taken at once, it left a blank line behind."""
    size = os.fstat(fd).st_size
    for _ in range(_SETTLE_TRIES):
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return False
        time.sleep(_SETTLE)
        grown = os.fstat(fd).st_size
        if grown == size:
            return True
        size = grown
    return True


def _separator(fd: int) -> bytes:
    """What an append begins with: "\n" to end an unterminated last line, and a blank line
    after a backslash-newline, which tcpd would otherwise join to our line (one broken rule)."""
    newline = _needs_newline(fd)
    tail = os.pread(fd, 2, max(0, os.fstat(fd).st_size - 2))
    return b"\n" * (newline + (tail.endswith(b"\\") if newline else tail == b"\\\n"))
