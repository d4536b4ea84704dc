"""The process side of starting the daemon: --pid-file, held and locked for the daemon's life,
and --daemon's fork into the background. Both run in the main thread before any other thread
is started (a fork would not take the other threads along)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat


class PidFileError(Exception):
    """The pid file cannot be used; the message says why."""


class PidFile:
    """--pid-file, held for the daemon's life: opened without following a symlink (a link planted
    there would make root truncate and write the file it points to) and locked with flock, so a
    second daemon given the same file refuses to start instead of overwriting the first one's
    pid, which rc scripts then use to signal it. A stale file from a daemon that died is not
    locked and is taken over. Removed at exit."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._identity = _identity(os.fstat(fd))

    @classmethod
    def acquire(cls, path: str) -> PidFile:
        # A daemon exiting removes the file between our open and our lock: then the inode we
        # locked is no longer the path's, and we try again with the new one.
        for _ in range(5):
            fd = cls._open(path)
            try:
                cls._lock(path, fd)
                try:
                    current = _identity(os.stat(path, follow_symlinks=False))
                except FileNotFoundError:
                    current = None
                if current == _identity(os.fstat(fd)):
                    return cls(path, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise PidFileError(f"{path}: the pid file keeps being replaced; is another portsentry starting?")

    @staticmethod
    def _open(path: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise PidFileError(f"{path}: refusing to use a symlink as the pid file") from None
            raise PidFileError(f"{path}: cannot open the pid file: {error.strerror or error}") from None
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_nlink != 1:
            problem = f"it has {st.st_nlink} hard links"  # truncating it would truncate them
        elif st.st_uid != os.geteuid():
            problem = f"it belongs to uid {st.st_uid}"
        if problem:
            os.close(fd)
            raise PidFileError(f"{path}: refusing to use it as the pid file: {problem}")
        return fd

    @staticmethod
    def _lock(path: str, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise PidFileError(
                f"{path}: another portsentry (pid {holder}) holds this pid file; "
                "refusing to start a second daemon with it"
            ) from None

    def write(self, pid: int) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode("ascii"), 0)

    def release(self) -> None:
        """Remove the file (if it is still ours) and let the lock go."""
        with contextlib.suppress(OSError):
            if _identity(os.stat(self.path, follow_symlinks=False)) == self._identity:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def daemonize() -> None:
    """1.2's daemon(): fork, new session, cwd /, umask 077, standard streams to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o077)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
