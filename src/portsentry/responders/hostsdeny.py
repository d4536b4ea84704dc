"""The KILL_HOSTS_DENY responder: add (and remove) whole lines in hosts.deny without duplicates,
without losing lines other tools append at the same time, and without touching any other line.

Design
- Locking. Each operation holds a `threading.Lock` (threads of this process) and an exclusive
  `flock` on a separate lock file, `<path>.portsentry.lock` (other PortSentry processes). The lock
  is not taken on hosts.deny itself because `remove()` replaces hosts.deny by rename: a process
  that opened the path before the rename would lock the old inode while the next one locks the
  new inode, and both would proceed. The lock file is never replaced. It is created 0600 and
  refused if others may open it, because anyone who can open a file can flock it and so stall
  blocking; waiting for the lock gives up after `lock_timeout` seconds with HostsDenyError.
- add() reads the file, returns False if the same line is already there (whole line, trailing
  blanks/CR ignored), otherwise appends it with one write() on an O_APPEND descriptor (after a
  "\\n" if the file does not end with one) and fsyncs. It appends rather than rewrites, so a tool
  that appends without our lock (fail2ban's `printf ... >> /etc/hosts.deny`) never loses a line.
- remove() writes the remaining lines to a temporary file in the same directory with the
  original mode, owner and (best effort) extended attributes, fsyncs it and renames it over
  hosts.deny, which is atomic: readers see the old or the new file, never a partial one. Lines a
  lockless appender added to the old file after our read (it opened the path before the rename)
  are then copied from the still-open old inode to the end of the new file; copying repeats
  until the old file has been quiet for REMOVE_SETTLE seconds. An appender that opened the file
  before the rename and writes only after that can still lose its line; shells and fail2ban write
  immediately after opening.
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
from collections.abc import Iterator

LOCK_SUFFIX = ".portsentry.lock"
NEW_FILE_MODE = 0o644
# How long remove() keeps copying from the replaced file before it assumes no appender is left.
REMOVE_SETTLE = 0.005
_LOCK_POLL = 0.01
_TRAILING = b" \t\r"


class HostsDenyError(Exception):
    """hosts.deny cannot be used safely; the message names the file and the reason."""


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


def _read_all(fd: int, offset: int = 0) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    # Regular files practically never take a short write, but if one did, loop rather than
    # silently drop the tail.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class HostsDeny:
    """One hosts.deny file (normally /etc/hosts.deny)."""

    def __init__(self, path: str, *, lock_timeout: float = 10.0) -> None:
        self.path = path
        self.lock_path = path + LOCK_SUFFIX
        self.lock_timeout = lock_timeout
        self._thread_lock = threading.Lock()

    def add(self, line: str) -> bool:
        """Append `line`; True if written, False if an identical line was already there."""
        wanted = _encode_line(line)
        with self._locked():
            fd = self._open(os.O_RDWR | os.O_APPEND, create=True)
            try:
                content = _read_all(fd)
                if any(_same(raw, wanted) for raw in _split(content)):
                    return False
                # Look at the last byte again right before writing: a lockless appender may have
                # added to the file since our read.
                size = os.fstat(fd).st_size
                needs_newline = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
                _write_all(fd, (b"\n" if needs_newline else b"") + wanted + b"\n")
                os.fsync(fd)
                return True
            finally:
                os.close(fd)

    def remove(self, line: str) -> bool:
        """Remove every line equal to `line` (trailing blanks/CR ignored); True if any went."""
        wanted = _encode_line(line)
        with self._locked():
            try:
                old = self._open(os.O_RDONLY, create=False)
            except FileNotFoundError:
                return False
            try:
                content = _read_all(old)
                lines = _split(content)
                kept = [raw for raw in lines if not _same(raw, wanted)]
                if len(kept) == len(lines):
                    return False
                self._replace(old, b"".join(kept), len(content))
                return True
            finally:
                os.close(old)

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

    def _replace(self, old: int, content: bytes, read_upto: int) -> None:
        """Atomically put `content` in place of the file open as `old`; carry over late appends."""
        st = os.fstat(old)
        directory, name = os.path.split(os.path.abspath(self.path))
        tmp_path = os.path.join(directory, f".{name}.portsentry-{os.getpid()}-{time.time_ns()}.tmp")
        new = os.open(
            tmp_path,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            try:
                _write_all(new, content)
                self._copy_metadata(old, new, st)
                os.fsync(new)
                os.replace(tmp_path, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_path)
                raise
            # From here on appenders that open the path get the new file (O_APPEND, like ours);
            # those that opened it earlier wrote to the old inode, which `old` still reaches.
            offset = read_upto
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < REMOVE_SETTLE:
                late = _read_all(old, offset)
                if late:
                    _write_all(new, late)
                    offset += len(late)
                    quiet_since = time.monotonic()
                else:
                    time.sleep(REMOVE_SETTLE / 5)
            os.fsync(new)
        finally:
            os.close(new)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def _copy_metadata(self, old: int, new: int, st: os.stat_result) -> None:
        new_st = os.fstat(new)
        if (new_st.st_uid, new_st.st_gid) != (st.st_uid, st.st_gid):
            try:
                os.fchown(new, st.st_uid, st.st_gid)
            except PermissionError as exc:
                raise HostsDenyError(
                    f"{self.path}: cannot rewrite it with its owner {st.st_uid}:{st.st_gid} "
                    "preserved (not permitted); run as root or as the file's owner"
                ) from exc
        # After chown, which clears set-id bits.
        os.fchmod(new, stat.S_IMODE(st.st_mode))
        # Best effort: SELinux labels and ACLs live in extended attributes.
        with contextlib.suppress(OSError, AttributeError):
            for attr in os.listxattr(old):
                with contextlib.suppress(OSError):
                    os.setxattr(new, attr, os.getxattr(old, attr))
