"""The KILL_HOSTS_DENY responder: add (and remove) whole lines in hosts.deny without duplicates,
without losing lines other tools append at the same time, and without touching any other line.

Design
- Ownership. A line is ours only when we appended it: add() finds the line absent, tells its
  caller (`on_append`, which records the copy in the ban store) and then appends. When an
  identical line is already there (the admin's, fail2ban's, same format) add() writes nothing
  and nothing is recorded, so lifting our ban never takes their line away. remove() takes out
  one copy, the first: ours was appended when no copy existed, so later copies are others'.
- Locking. Each operation holds a `threading.Lock` (threads of this process) and an exclusive
  `flock` on a separate lock file (other PortSentry processes: the daemon, `block`, `tidy`). The
  daemon keeps it beside its control socket (/run/portsentry/hosts.deny.lock), so the service
  needs write access to hosts.deny itself and to nothing else in /etc; without a lock path it is
  `<path>.portsentry.lock`. It is created 0600 and refused if others may open it, because anyone
  who can open a file can flock it and so stall blocking; waiting gives up after `lock_timeout`
  seconds with HostsDenyError.
- add() reads the file and appends the line with one write() on an O_APPEND descriptor (after a
  "\\n" if the file does not end with one), then fsyncs. A failed or short write is rolled back
  to the length before it (fileio.append_record): on a full disk a half line like
  `ALL: 198.18.` would deny all of 198.18.0.0/16. Appending rather than rewriting means a tool
  that appends without our lock (fail2ban's `printf ... >> /etc/hosts.deny`) never loses a line.
- remove() and tidy rewrite the file in place: same inode, owner, mode, labels, and no rename in
  /etc (a hardened unit may write hosts.deny but not its directory). The new content is written
  over the old and the file truncated to it, under a write lease (fcntl F_SETLEASE): while we
  hold it, another process's open() of hosts.deny waits, so a lockless appender's line lands
  after the rewrite and a reader (tcpd) sees the old file or the new one, never a mix. Where the
  file system has no leases, bytes appended after our read are still moved to the new end, and
  only an append in the instant before the cut can be lost. If the rewrite fails, the old
  content is written back.
- Refusals (HostsDenyError): hosts.deny or the lock file being a symlink (opened with
  O_NOFOLLOW, so there is no check-then-open race), not a regular file, or world-writable; the
  directory being world-writable without the sticky bit. A missing hosts.deny is created 0644 by
  add(); remove() and lines() treat it as empty.
- Bytes other than our line are never decoded, reordered or rewritten; lines are written with
  "\\n" and lines() decodes with surrogateescape, so anything it returns can be given to remove().
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from portsentry.journal.fileio import append_record, pwrite_all
from portsentry.responders.hostsdeny_lines import _TRAILING, _encode_line, _heads, _same, _separator

# Also read from here: bans/tidy.py (_read_all, _split) and the tests, which patch _write_lease here.
from portsentry.responders.hostsdeny_lines import _read_all as _read_all
from portsentry.responders.hostsdeny_lines import _split as _split
from portsentry.responders.lease import _write_lease as _write_lease

LOCK_SUFFIX = ".portsentry.lock"
NEW_FILE_MODE = 0o644
LOCK_DIRECTORY_MODE = 0o700
_LOCK_POLL = 0.01


class HostsDenyError(Exception):
    """hosts.deny cannot be used safely; the message names the file and the reason."""


class HostsDeny:
    """One hosts.deny file (normally /etc/hosts.deny)."""

    def __init__(self, path: str, *, lock_path: str | None = None, lock_timeout: float = 10.0) -> None:
        self.path = path
        self.lock_path = lock_path or path + LOCK_SUFFIX
        self.lock_timeout = lock_timeout
        self._thread_lock = threading.Lock()

    def add(self, line: str, on_append: Callable[[], None] | None = None) -> bool:
        """Append `line`; True if written (the copy is ours), False if an identical line was
        already there (it is not). `on_append` runs under the lock right before the append; if
        it raises, nothing is written."""
        wanted = _encode_line(line)
        with self._locked():
            fd = self._open(os.O_RDWR | os.O_APPEND, create=True)
            try:
                if any(_same(raw, wanted) for _i, raw in _heads(_split(_read_all(fd)))):
                    return False
                if on_append is not None:
                    on_append()
                # Look at the end again right before writing: a lockless appender may have added
                # to the file since our read.
                append_record(fd, _separator(fd) + wanted + b"\n", sync=True)
                return True
            finally:
                os.close(fd)

    def add_many(self, lines: Sequence[str],
                 on_append: Callable[[list[str]], None] | None = None) -> list[str]:
        """`add` for many lines with one read and one write (`portsentry block --file`); returns
        the lines appended (ours), told first to `on_append`."""
        wanted = list(dict.fromkeys(_encode_line(line) for line in lines))
        with self._locked():
            fd = self._open(os.O_RDWR | os.O_APPEND, create=True)
            try:
                present = {raw.rstrip(b"\n").rstrip(_TRAILING) for _i, raw in _heads(_split(_read_all(fd)))}
                absent = [line for line in wanted if line not in present]
                if not absent:
                    return []
                appended = [line.decode("utf-8", errors="surrogateescape") for line in absent]
                if on_append is not None:
                    on_append(appended)
                data = b"".join(line + b"\n" for line in absent)
                append_record(fd, _separator(fd) + data, sync=True)
                return appended
            finally:
                os.close(fd)

    def remove_many(self, lines: Sequence[str]) -> int:
        """`remove` for many lines (one copy each) with one rewrite; how many were there."""
        wanted: dict[bytes, int] = {}
        for line in lines:
            encoded = _encode_line(line)
            wanted[encoded] = wanted.get(encoded, 0) + 1
        with self._locked():
            try:
                fd = self._open(os.O_RDWR, create=False)
            except FileNotFoundError:
                return 0
            try:
                content = _read_all(fd)
                kept: list[bytes] = []
                removed = 0
                raws = _split(content)
                heads = {index for index, _raw in _heads(raws)}
                for index, raw in enumerate(raws):
                    key = raw.rstrip(b"\n").rstrip(_TRAILING)
                    if index in heads and wanted.get(key, 0) > 0:
                        wanted[key] -= 1
                        removed += 1
                    else:
                        kept.append(raw)
                if removed:
                    self._rewrite(fd, content, b"".join(kept))
                return removed
            finally:
                os.close(fd)

    def remove(self, line: str) -> bool:
        """Remove the first line equal to `line` (trailing blanks/CR ignored), the copy we own;
        True if there was one."""
        wanted = _encode_line(line)
        with self._locked():
            try:
                fd = self._open(os.O_RDWR, create=False)
            except FileNotFoundError:
                return False
            try:
                content = _read_all(fd)
                lines = _split(content)
                for index, raw in _heads(lines):
                    if _same(raw, wanted):
                        self._rewrite(fd, content, b"".join(lines[:index] + lines[index + 1:]))
                        return True
                return False
            finally:
                os.close(fd)

    def lines(self) -> list[str]:
        """The file's lines without their "\\n", otherwise as they are; [] if there is no file."""
        with self._locked():
            try:
                fd = self._open(os.O_RDONLY, create=False)
            except FileNotFoundError:
                return []
            try:
                content = _read_all(fd)
            finally:
                os.close(fd)
        return [
            raw.rstrip(b"\n").decode("utf-8", errors="surrogateescape") for raw in _split(content)
        ]

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._thread_lock.acquire(timeout=self.lock_timeout):
            raise HostsDenyError(f"{self.path}: timed out waiting for another thread's update")
        try:
            self._check_directory()
            fd = self._open_lock_file()
            try:
                self._flock(fd)
                yield
            finally:
                os.close(fd)  # also releases the flock
        finally:
            self._thread_lock.release()

    def _check_directory(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        st = os.stat(directory)
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise HostsDenyError(
                f"{self.path}: refusing to use it: directory {directory} is world-writable "
                "without the sticky bit, so anyone could replace the file"
            )

    def _open_lock_file(self) -> int:
        directory = os.path.dirname(os.path.abspath(self.lock_path))
        os.makedirs(directory, mode=LOCK_DIRECTORY_MODE, exist_ok=True)
        try:
            fd = os.open(
                self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise HostsDenyError(
                    f"{self.lock_path}: refusing to use a symlink as the hosts.deny lock file"
                ) from exc
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            os.close(fd)
            raise HostsDenyError(
                f"{self.lock_path}: lock file must be a regular file only its owner can open "
                f"(mode 0600, is {stat.filemode(st.st_mode)}); fix it with chmod 600 or delete it"
            )
        return fd

    def _flock(self, fd: int) -> None:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HostsDenyError(
                        f"{self.lock_path}: still locked by another process after "
                        f"{self.lock_timeout:g} s; is another portsentry updating {self.path}?"
                    ) from None
                time.sleep(_LOCK_POLL)

    def _open(self, flags: int, *, create: bool) -> int:
        """Open hosts.deny (never through a symlink) and check it is safe to use."""
        flags |= os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
                    os.fchmod(fd, NEW_FILE_MODE)  # not narrowed by the umask
                except FileExistsError:  # created by someone else meanwhile
                    fd = os.open(self.path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise HostsDenyError(
                    f"{self.path}: refusing to write hosts.deny through a symlink; "
                    "point the configuration at the real file"
                ) from exc
            if exc.errno == errno.EROFS:
                # Under the hardened unit only the file is writable, as a bind mount of its inode;
                # a tool that replaces it by rename (sed -i, fail2ban's unban) leaves us the new,
                # read-only one until the service starts again.
                raise HostsDenyError(
                    f"{self.path}: read-only here ({exc.strerror}); if it was replaced by rename "
                    "(sed -i, fail2ban's hostsdeny unban), restart portsentry to write it again"
                ) from exc
            raise
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_mode & stat.S_IWOTH:
            problem = f"it is world-writable ({stat.filemode(st.st_mode)}); chmod o-w it"
        if problem:
            os.close(fd)
            raise HostsDenyError(f"{self.path}: refusing to use it: {problem}")
        return fd

    def _rewrite(self, fd: int, old: bytes, new: bytes) -> None:
        """Put `new` in place of `old` in the file open (without O_APPEND) as `fd`, in place.

        Under a write lease (see `_write_lease`) nobody else can open the file meanwhile, so no
        lockless appender's line can fall between our last look and the cut, and no reader sees
        half a rewrite. Without one (a file system without leases), bytes appended after `old`
        was read are still copied to follow `new` until the size holds still, and only an append
        in the instant between that last check and the cut is lost. On any failure the old
        content is written back before the error is raised.
        """
        with _write_lease(fd, self.lock_timeout):
            try:
                pwrite_all(fd, new, 0)
                seen, end = len(old), len(new)
                while (size := os.fstat(fd).st_size) > seen:
                    late = _read_all(fd, seen)[: size - seen]
                    pwrite_all(fd, late, end)
                    seen, end = size, end + len(late)
                os.ftruncate(fd, end)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    pwrite_all(fd, old, 0)
                    os.fsync(fd)
                raise


