"""A write lease (fcntl F_SETLEASE) held while HostsDeny rewrites hosts.deny in place, so no other
process opens the file halfway through. Runs in the caller's thread; the lease break is a
signal whose default action is nothing, so no handler (and no main thread) is needed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import signal
import time
from collections.abc import Iterator

# A lease break is signalled to the holder; SIGWINCH's default action is to do nothing, whereas
# the default SIGIO would kill the process (and setting a handler needs the main thread).
_LEASE_SIGNAL = signal.SIGWINCH
_LEASE_RETRY = 0.001


@contextlib.contextmanager
def _write_lease(fd: int, timeout: float) -> Iterator[None]:
    """Hold a write lease on `fd` while the block runs: another process's open() of the file
    waits until we let go, so a lockless `printf >> hosts.deny` cannot land in the middle of a
    rewrite and readers see the old file or the new one. A lease needs the file to be open
    nowhere else, so a moment of someone else's read is waited out (up to `timeout`, then we go
    on without); a file system without leases is used without one."""
    leased = False
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, _LEASE_SIGNAL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
                leased = True
                break
            except (BlockingIOError, PermissionError) as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY) or time.monotonic() >= deadline:
                    break
                time.sleep(_LEASE_RETRY)
    except OSError:
        pass  # no leases here (EINVAL, ENOLCK): the size checks in _rewrite still apply
    try:
        yield
    finally:
        if leased:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
