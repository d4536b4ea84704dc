"""What `portsentry demo` (cli.demo) does around its story: narration, commands inside a
namespace under the demo's overall deadline, waiting for the daemon's log lines or files, steps
that fail alone with --keep-going, and removing what the run made. All of it runs in the demo's
main thread; the syslog receiver's thread (cli.demokit) only queues the lines pump() and
wait_log() narrate.
"""

from __future__ import annotations

import contextlib
import queue
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from portsentry.cli.demokit import (
    COMMAND_TIMEOUT,
    StepFailed,
    SyslogReceiver,
    remove_namespace,
    stop_process,
)


class DemoRun:
    """The machinery of one demo run; the demo's __init__ sets these attributes."""

    out: TextIO
    keep_going: bool
    deadline: float
    namespaces: list[str]
    workdir: Path | None
    syslog: SyslogReceiver | None
    daemon: subprocess.Popen[bytes] | None
    seen: list[str]
    failures: list[str]

    # -- output ------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def heading(self, text: str) -> None:
        self.say()
        self.say(f"== {text}")

    # -- helpers -----------------------------------------------------------------------------

    def budget(self, timeout: float) -> float:
        """`timeout`, cut so that no step runs past the demo's overall deadline."""
        return max(0.5, min(timeout, self.deadline - time.monotonic()))

    def run(self, argv: Sequence[str], *, ns: str | None = None, input_text: str | None = None,
            timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
        try:
            proc = subprocess.run(full, capture_output=True, text=True, input=input_text,
                                  timeout=self.budget(timeout), check=False)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"`{shlex.join(argv)}` did not finish within {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise StepFailed(f"`{shlex.join(argv)}` failed ({proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def pump(self) -> None:
        """Narrate every daemon line that has arrived so far."""
        assert self.syslog is not None
        while True:
            try:
                line = self.syslog.lines.get_nowait()
            except queue.Empty:
                return
            self.seen.append(line.message)
            self.say(f"    portsentry[{line.pid}]: {line.message}")

    def wait_log(self, needle: str, timeout: float, what: str) -> str:
        """Narrate daemon lines until one contains `needle`; fail after `timeout`."""
        assert self.syslog is not None
        for message in self.seen:
            if needle in message:
                return message
        deadline = time.monotonic() + self.budget(timeout)
        while True:
            try:
                line = self.syslog.lines.get(timeout=0.1)
            except queue.Empty:
                self.check_daemon_alive(what)
                if time.monotonic() > deadline:
                    raise StepFailed(f"{what}: no daemon line containing {needle!r} within "
                                     f"{timeout:.0f}s") from None
                continue
            self.seen.append(line.message)
            self.say(f"    portsentry[{line.pid}]: {line.message}")
            if needle in line.message:
                return line.message

    def wait_until(self, probe: Callable[[], str | None], timeout: float, what: str) -> str:
        """Poll `probe` until it returns text; the daemon writes files just after it logs."""
        deadline = time.monotonic() + self.budget(timeout)
        while True:
            result = probe()
            if result is not None:
                return result
            self.check_daemon_alive(what)
            if time.monotonic() > deadline:
                raise StepFailed(f"{what}: not seen within {timeout:.0f}s")
            time.sleep(0.1)

    def check_daemon_alive(self, what: str) -> None:
        if self.daemon is not None and self.daemon.poll() is not None:
            self.pump()
            raise StepFailed(f"{what}: the daemon exited with status {self.daemon.returncode}\n"
                             f"{self.daemon_stderr()}")

    def daemon_stderr(self, lines: int = 15) -> str:
        if self.workdir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.workdir / "daemon.stderr").read_text(errors="replace")
            tail = text.splitlines()[-lines:]
            return "daemon stderr (last lines):\n" + "\n".join(f"    {row}" for row in tail)
        return ""

    def step(self, name: str, action: Callable[[], None]) -> None:
        """Run one narrated step; a failure stops the demo unless `keep_going`."""
        try:
            action()
        except StepFailed as failure:
            self.failures.append(f"{name}: {failure}")
            self.say(f"!! FAILED ({name}): {failure}")
            failure.reported = True
            if not self.keep_going:
                raise

    # -- teardown ----------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove everything this run made; returns what could not be removed."""
        problems: list[str] = []
        if self.daemon is not None:
            stop_process(self.daemon)
        for ns in self.namespaces:
            problems += remove_namespace(ns)
        if self.syslog is not None:
            self.syslog.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.workdir.exists():
                problems.append(f"could not remove {self.workdir}")
        return problems
