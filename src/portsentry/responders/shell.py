"""Run a user's KILL_ROUTE / KILL_RUN_CMD string through `/bin/sh -c`, as 1.2 configs expect, with
a deadline, bounded captured output and an honest success flag.

Differences from 1.2's `system()`, on purpose:
- Success means exit status 0 (1.2 counted any exit but 127 as success).
- The command runs in its own session; on timeout the whole process group is sent SIGTERM, then
  SIGKILL after a short grace, so `a | b` pipelines and `sleep 30 & wait` leave nothing behind.
  The group is signalled while the shell is still unreaped (only polled with WNOWAIT), so its
  process-group id cannot have been reused by an unrelated process.
- stdin is /dev/null; stdout and stderr share one pipe and the first OUTPUT_LIMIT bytes are kept.
- The shell is started with os.posix_spawn (glibc: a vfork), not subprocess.Popen: a ban's
  KILL_ROUTE waits for it, and Popen's Python costs a few hundred microseconds more per ban.
- When the shell exits normally we return at once, even if a background job it started
  (`cmd &`) still holds the pipe; that job is left running (as with `system()`), but the pipe is
  closed, so such jobs should redirect their own output (`cmd >/dev/null 2>&1 &`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

SHELL = "/bin/sh"
OUTPUT_LIMIT = 4096
TRUNCATED_MARK = "\n[output truncated]"
# Time between SIGTERM and SIGKILL for the process group of a command that ran out of time.
KILL_GRACE = 0.5
# Exit polling interval, only used where pidfd_open (Linux >= 5.3) is unavailable.
_POLL = 0.02


@dataclass(frozen=True)
class CommandResult:
    """What became of one shell command.

    `returncode` is None if the shell could not be started (then `output` says why), negative
    (-signal) if the shell was killed by a signal, as in `subprocess`.
    """

    command: str
    returncode: int | None
    timed_out: bool
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def failure(self) -> str:
        """What went wrong, for the log: the command, why, and the start of its output."""
        if self.timed_out:
            reason = f"timed out after {self.seconds:.1f}s"
        elif self.returncode is None:
            reason = "could not be started"
        else:
            reason = f"exit status {self.returncode}"
        output = self.output.strip().replace("\n", " | ")
        return f'"{self.command}" {reason}' + (f": {output[:300]}" if output else "")


class _Output:
    """Keeps the first OUTPUT_LIMIT bytes read from a pipe and discards (but drains) the rest."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        room = OUTPUT_LIMIT - len(self.data)
        if len(chunk) > room:
            self.truncated = True
        self.data += chunk[: max(room, 0)]

    def text(self) -> str:
        out = self.data.decode("utf-8", errors="replace")
        return out + TRUNCATED_MARK if self.truncated else out


def _exited(pid: int) -> bool:
    """True once `pid` has exited, without reaping it (so its pid/pgid stay reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    except ChildProcessError:
        return True
    return info is not None


def run_shell(command: str, timeout: float) -> CommandResult:
    """Run `command` with `/bin/sh -c`, wait at most `timeout` seconds, never raise for its failure.

    Blocking: call it from a worker, not from the detection loop.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, not {timeout!r}")
    start = time.monotonic()
    try:
        pid, pipe = _spawn(command)
    except (OSError, ValueError) as exc:  # ValueError: NUL byte in the command
        return CommandResult(command, None, False, f"cannot run {SHELL}: {exc}", 0.0)
    return wait_shell(command, pid, pipe, start, timeout)


def wait_shell(command: str, pid: int, pipe: int, start: float, timeout: float) -> CommandResult:
    """See through a shell already started as `_spawn` starts it (the fast lane's KILL_ROUTE,
    sensors/lane.c): its output from `pipe` (closed here), the deadline from `start`
    (time.monotonic()), then reaped. Blocking, as run_shell."""
    out = _Output()
    try:
        timed_out = _supervise(pid, pipe, start + timeout, out)
    finally:
        os.close(pipe)
        status = _reap(pid)
    return CommandResult(
        command=command,
        returncode=status,
        timed_out=timed_out,
        output=out.text(),
        seconds=time.monotonic() - start,
    )


# Signals the daemon ignores (SIGPIPE) or that Python changed, reset for the shell as
# subprocess's restore_signals does: an ignored signal stays ignored across exec.
_DEFAULT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ")
                         if hasattr(signal, name))
_inherited_closed = False


def _spawn(command: str) -> tuple[int, int]:
    """Start the shell in a session of its own, stdin /dev/null, stdout and stderr into a new
    pipe; (pid, read end of the pipe). Raises OSError or ValueError when it cannot start.

    os.posix_spawn (a vfork in glibc) starts the shell in about a tenth of subprocess.Popen's
    time, and a ban's KILL_ROUTE waits for it. It has no close_fds: the interpreter opens every
    file descriptor close-on-exec (PEP 446), and those inherited from whoever started us are
    made so once, below. Where the pipe would land on 0-2 (a parent closed them), subprocess
    does the juggling instead."""
    global _inherited_closed
    if not _inherited_closed:
        _close_inherited_on_exec()
        _inherited_closed = True
    read_end, write_end = os.pipe()
    try:
        if min(read_end, write_end) <= 2:
            return _popen(command, read_end, write_end), read_end
        pid = os.posix_spawn(
            SHELL, [SHELL, "-c", command], os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, write_end, 1), (os.POSIX_SPAWN_DUP2, write_end, 2)],
            setsid=True, setsigdef=_DEFAULT_SIGNALS)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return pid, read_end


def _popen(command: str, read_end: int, write_end: int) -> int:
    proc = subprocess.Popen([SHELL, "-c", command], stdin=subprocess.DEVNULL, stdout=write_end,
                            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    # The child is reaped by _reap (os.waitpid), not by this object: keep it from reaping too.
    proc.returncode = 0
    return proc.pid


def _close_inherited_on_exec() -> None:
    """Mark the descriptors this process inherited (>= 3) close-on-exec, as close_fds would
    close them in every child: no command of ours has ever been handed one."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)


def _reap(pid: int) -> int | None:
    """Wait for the shell; its exit status as subprocess reports it (-N for signal N)."""
    while True:
        try:
            _pid, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status)


def _supervise(pid: int, pipe: int, deadline: float, out: _Output) -> bool:
    """Collect output until the shell exits or `deadline` passes (then kill its group: True).

    Leaves the shell unreaped; the caller reaps it.
    """
    os.set_blocking(pipe, False)
    pidfd = -1
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)
    # Without a pidfd, exit is noticed by polling, so the select must wake up regularly.
    tick = None if pidfd >= 0 else _POLL
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ, "pipe")
        if pidfd >= 0:
            sel.register(pidfd, selectors.EVENT_READ, "pid")
        try:
            while not _exited(pid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _kill_group(pid, sel, pipe, out)
                    return True
                _pump(sel, pipe, out, remaining if tick is None else min(remaining, tick))
            # Output the shell wrote before exiting is already in the pipe; a background job
            # still holding the pipe open must not keep us waiting.
            if pipe in sel.get_map():
                _drain(pipe, out)
            return False
        finally:
            if pidfd >= 0:
                os.close(pidfd)


def _pump(sel: selectors.BaseSelector, pipe: int, out: _Output, wait: float) -> None:
    """Wait up to `wait` s for output or exit; read output; stop watching a closed pipe."""
    for key, _ in sel.select(wait):
        if key.data == "pipe" and not _drain(pipe, out):
            sel.unregister(pipe)


def _drain(pipe: int, out: _Output) -> bool:
    """Read what is available now; False at EOF."""
    while True:
        try:
            chunk = os.read(pipe, 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        out.feed(chunk)


def _kill_group(pid: int, sel: selectors.BaseSelector, pipe: int, out: _Output) -> None:
    # The shell is not reaped yet (only polled with WNOWAIT), so `pid` still names its group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    grace_end = time.monotonic() + KILL_GRACE
    while not _exited(pid):
        remaining = grace_end - time.monotonic()
        if remaining <= 0:
            break
        # Keep reading: a child blocked on a full pipe must get to see its SIGTERM.
        _pump(sel, pipe, out, min(remaining, _POLL))
    # Unconditional: children that ignore SIGTERM may outlive the shell.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if pipe in sel.get_map():
        _drain(pipe, out)
