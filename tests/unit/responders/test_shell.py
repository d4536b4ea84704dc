"""run_shell: /bin/sh -c semantics, honest success flag, bounded output, and clean timeouts."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator

import pytest

from portsentry.responders import shell
from portsentry.responders.shell import OUTPUT_LIMIT, TRUNCATED_MARK, CommandResult, run_shell


def _alive(pid: int) -> bool:
    """True if `pid` runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, within: float = 2.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def reap_later() -> Iterator[list[int]]:
    """Pids a test leaves behind on purpose; killed afterwards so nothing outlives the test."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_exit_zero_is_ok() -> None:
    r = run_shell("true", 5)
    assert (r.returncode, r.timed_out, r.ok, r.output) == (0, False, True, "")
    assert r.command == "true"
    assert 0 <= r.seconds < 2


def test_non_zero_exit_is_failure() -> None:
    # 1.2's system() check counted this as success.
    r = run_shell("exit 1", 5)
    assert r.returncode == 1
    assert not r.ok


def test_command_not_found_is_127() -> None:
    r = run_shell("/nonexistent/portsentry-test-cmd 198.18.0.1", 5)
    assert r.returncode == 127
    assert not r.ok
    assert "not found" in r.output or "No such file" in r.output


def test_pipes_and_shell_syntax_work() -> None:
    r = run_shell("printf 'a\\nb\\nc\\n' | wc -l | tr -d ' '; echo done && exit 3", 5)
    assert r.output == "3\ndone\n"
    assert r.returncode == 3


def test_stderr_is_captured_with_stdout() -> None:
    r = run_shell("echo out; echo err >&2", 5)
    assert r.output == "out\nerr\n"


def test_stdin_is_dev_null() -> None:
    r = run_shell("cat; echo end", 5)
    assert r.output == "end\n"
    assert r.ok


def test_output_is_truncated() -> None:
    r = run_shell("head -c 200000 /dev/zero | tr '\\0' x", 5)
    assert r.ok
    assert r.output == "x" * OUTPUT_LIMIT + TRUNCATED_MARK


def test_output_at_limit_is_not_marked() -> None:
    r = run_shell(f"head -c {OUTPUT_LIMIT} /dev/zero | tr '\\0' y", 5)
    assert r.output == "y" * OUTPUT_LIMIT


def test_invalid_utf8_output_is_replaced() -> None:
    r = run_shell("printf 'a\\377b'", 5)
    assert r.output == "a\ufffdb"


def test_timeout_kills_the_command() -> None:
    start = time.monotonic()
    r = run_shell("sleep 30", 0.5)
    took = time.monotonic() - start
    assert r.timed_out
    assert not r.ok
    assert took < 3
    assert 0.4 < r.seconds < 3
    assert r.returncode is not None and r.returncode < 0  # killed by a signal


def test_timeout_kills_the_grandchild_and_keeps_partial_output() -> None:
    start = time.monotonic()
    r = run_shell("sleep 30 & echo $!; wait", 0.5)
    assert time.monotonic() - start < 3
    assert r.timed_out
    pid = int(r.output.split()[0])
    assert _wait_gone(pid), f"grandchild {pid} survived the timeout"


def test_timeout_kills_children_that_ignore_sigterm() -> None:
    # An ignored signal stays ignored across exec, so this sleep ignores SIGTERM too.
    start = time.monotonic()
    r = run_shell("trap '' TERM; sleep 30 & echo $!; wait; wait", 0.3)
    assert time.monotonic() - start < 3
    assert r.timed_out
    pid = int(r.output.split()[0])
    assert _wait_gone(pid), f"SIGTERM-ignoring grandchild {pid} survived"


def test_timeout_with_a_full_pipe() -> None:
    # The writer blocks on a full pipe unless we keep reading while we wait.
    r = run_shell("while :; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxx; done", 0.3)
    assert r.timed_out
    assert r.output.endswith(TRUNCATED_MARK)


def test_background_job_holding_the_pipe_does_not_block(reap_later: list[int]) -> None:
    # Like system(): the shell's exit ends the wait even if a job it started lives on.
    start = time.monotonic()
    r = run_shell("sleep 5 & echo $!", 5)
    assert time.monotonic() - start < 2
    assert r.ok and not r.timed_out
    reap_later.append(int(r.output.split()[0]))


def test_missing_shell_reports_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shell, "SHELL", "/nonexistent/sh")
    r = run_shell("true", 5)
    assert r.returncode is None
    assert not r.ok and not r.timed_out
    assert "/nonexistent/sh" in r.output


def test_nul_byte_is_reported_not_raised() -> None:
    r = run_shell("echo a\0b", 5)
    assert r.returncode is None
    assert not r.ok
    assert "null" in r.output.lower()


@pytest.mark.parametrize("bad", [0, -1.0])
def test_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        run_shell("true", bad)


def test_ok_property_and_frozen() -> None:
    r = CommandResult("x", 0, True, "", 1.0)
    assert not r.ok  # a timed-out command is never a success, whatever its status
    assert CommandResult("x", 0, False, "", 1.0).ok
    assert not CommandResult("x", None, False, "", 1.0).ok
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.returncode = 1  # type: ignore[misc]


def test_works_without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    # Older kernels: exit is noticed by polling instead.
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert run_shell("echo hi", 5).output == "hi\n"
    r = run_shell("sleep 30", 0.3)
    assert r.timed_out
    assert r.seconds < 3


def test_no_fd_leak() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        run_shell("echo x", 5)
    run_shell("sleep 10", 0.1)
    assert len(os.listdir("/proc/self/fd")) == before


def test_runs_in_its_own_session() -> None:
    # The session (and so the process group killed on timeout) is the shell's own.
    r = run_shell("ps -o sid= -p $$; echo $$", 5)
    sid, pid = r.output.split()
    assert sid == pid != str(os.getpid())


def test_ignored_sigpipe_is_not_inherited() -> None:
    # The daemon ignores SIGPIPE; an ignored signal would stay ignored in the shell and its
    # pipelines (`yes | head` would then never end by SIGPIPE).
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        r = run_shell("grep SigIgn /proc/$$/status", 5)
    finally:
        signal.signal(signal.SIGPIPE, previous)
    ignored = int(r.output.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))


def test_inherited_descriptors_do_not_reach_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    # Descriptors of ours are close-on-exec; one inherited from whoever started us is made so
    # before the first command (subprocess's close_fds closed them in every child).
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    monkeypatch.setattr(shell, "_inherited_closed", False)
    try:
        r = run_shell(f"ls /proc/$$/fd; true >&{write_end} && echo reached", 5)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert str(write_end) not in r.output.split()
    assert "reached" not in r.output


def test_descriptors_0_to_2_closed_in_the_parent_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # A parent that started us with fds 0-2 closed: the pipe may land there, and subprocess
    # (which juggles such descriptors) starts the shell instead of posix_spawn.
    real_pipe = os.pipe
    low: list[int] = []

    def pipe_at_two() -> tuple[int, int]:
        read_end, write_end = real_pipe()
        if low:  # subprocess's own pipes, once ours is made
            return read_end, write_end
        saved = os.dup(2)
        low.append(saved)
        os.dup2(write_end, 2, inheritable=False)
        os.close(write_end)
        return read_end, 2

    def refuse(*_args: object, **_kwargs: object) -> int:
        raise AssertionError("posix_spawn with the pipe on fd 2")

    monkeypatch.setattr(os, "pipe", pipe_at_two)
    monkeypatch.setattr(os, "posix_spawn", refuse)
    try:
        r = run_shell("echo via-popen; exit 4", 5)
    finally:
        os.dup2(low[0], 2)
        os.close(low[0])
    assert (r.returncode, r.output) == (4, "via-popen\n")
