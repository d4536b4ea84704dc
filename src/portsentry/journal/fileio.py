"""Whole-or-nothing writes to the files admins and their tools read: hosts.deny, the history and
blocked files, the event log.

A record is one write() of whole lines on an O_APPEND descriptor. If that write fails or comes up
short (a full disk: ENOSPC after a few bytes), the file is truncated back to the length it had
before, so no reader ever sees half a record. Half a hosts.deny line is worse than none:
`ALL: 198.18.` is a prefix pattern that denies all of 198.18.0.0/16. Callers hold their own lock
(a thread lock, and a flock where other processes write too) around the whole call, so the
length taken before the write is theirs to restore.
"""

from __future__ import annotations

import contextlib
import errno
import os


class ShortWrite(OSError):
    """The kernel took only part of a record; the file was rolled back."""


def append_record(fd: int, data: bytes, *, sync: bool = False) -> None:
    """Append `data` to the O_APPEND file `fd` in one write, or leave the file as it was and raise
    OSError. With `sync`, the record is on disk before this returns (and rolled back if not)."""
    before = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise ShortWrite(errno.ENOSPC, f"short write: {written} of {len(data)} bytes, rolled back")
        if sync:
            os.fsync(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, before)
            if sync:
                os.fsync(fd)
        raise


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset` (never on an O_APPEND descriptor: Linux appends there)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise ShortWrite(errno.ENOSPC, "no progress writing")
        view = view[written:]
        offset += written
