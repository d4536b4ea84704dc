"""Carries out a Block the classic way: KILL_HOSTS_DENY, KILL_ROUTE and KILL_RUN_CMD, in the engine's order.

Runs on a worker thread so a slow or hanging command never stalls detection; each command has a
timeout. A step counts as done only when it really worked (exit 0), unlike 1.2, which logged a
failed command as a block. The host counts as blocked when at least one blocking step
(hosts.deny or route) worked, or, for BLOCK_x=2, when the command worked; every failure is logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from portsentry.core import messages
from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import IPAddress
from portsentry.journal.failures import HOSTS_DENY, WriteFailures
from portsentry.journal.telemetry import Telemetry
from portsentry.responders.hostsdeny import HostsDeny, HostsDenyError
from portsentry.responders.shell import CommandResult, run_shell, wait_shell
from portsentry.responders.substitute import hosts_deny_entry, substitute

Logger = Callable[[str], None]


Runner = Callable[[str, float], CommandResult]


class BanKeeper(Protocol):
    """The ban lifecycle's side of a block (bans.lifecycle.BanManager): the native set, and
    hosts.deny lines recorded as ours. Without one, NATIVE steps are skipped and hosts.deny is
    written directly (`check-config --test-block`)."""

    def ban_native(self, address: IPAddress, duration: float | None,
                   failed: list[str] | None = None) -> bool: ...
    def add_line(self, address: IPAddress, line: str, now: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class StepFailure:
    """A step that failed, with the lines said of it, word for word as the log has them: an
    admin's `block` or `unblock` shows them (the daemon's log alone is not where they look)."""

    kind: StepKind
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Carried:
    """What a block's steps did: whether the host counts as blocked, the blocking steps that
    worked, in the block's order (what holds the ban: the ban event names the first), and the
    steps that failed."""

    done: bool
    held_by: tuple[StepKind, ...] = ()
    failed: tuple[StepFailure, ...] = ()


class ClassicResponder:
    def __init__(
        self,
        hosts_deny: HostsDeny,
        log: Logger,
        timeout: float,
        runner: Runner = run_shell,
        verbose_log: Logger | None = None,
        clock: Callable[[], float] = time.time,
        telemetry: Telemetry | None = None,
        failures: WriteFailures | None = None,
    ) -> None:
        self.failures = failures
        self.telemetry = telemetry or Telemetry()
        self.clock = clock
        self.hosts_deny = hosts_deny
        self.timeout = timeout
        self._log = log
        self._verbose = verbose_log or (lambda _text: None)
        self._run = runner
        # time.monotonic() by which the daemon's stop wants every command done (stop_by).
        self._stop_by: float | None = None

    def stop_by(self, deadline: float) -> None:
        """The daemon is stopping: commands started from now on get only the time left until
        `deadline` (time.monotonic()), and none starts after it. Without this a block's
        KILL_ROUTE and KILL_RUN_CMD, both hanging, held the stop for twice COMMAND_TIMEOUT."""
        self._stop_by = deadline

    def carry_out(self, block: Block, duration: float | None, keeper: BanKeeper | None = None) -> bool:
        """Run the steps for a ban of `duration` seconds (None: forever); True when the host
        counts as blocked. The record is the caller's (BanManager.enforce)."""
        return self.run_steps(block, duration, keeper).done

    def run_steps(self, block: Block, duration: float | None, keeper: BanKeeper | None = None) -> Carried:
        """carry_out, saying which blocking steps worked."""
        probe = block.probe
        blocking_steps = 0
        held_by: list[StepKind] = []
        failed: list[StepFailure] = []
        command_ok = True
        for step in block.steps:
            if step.kind is StepKind.NATIVE and keeper is None:
                continue
            started = time.monotonic()
            said: list[str] = []
            error = self._step(step, block, duration, keeper, said)
            self.telemetry.action(probe.source, step.kind.value, time.monotonic() - started, error,
                                  self.clock(), probe)
            if error is not None:
                failed.append(StepFailure(step.kind, tuple(said)))
            if step.kind is StepKind.RUN_CMD:
                command_ok = error is None
                continue
            blocking_steps += 1
            if error is None:
                held_by.append(step.kind)
        return Carried(bool(held_by) if blocking_steps else command_ok, tuple(held_by), tuple(failed))

    def _time_left(self) -> float:
        """COMMAND_TIMEOUT, or less once the daemon is stopping (stop_by)."""
        if self._stop_by is None:
            return self.timeout
        return min(self.timeout, self._stop_by - time.monotonic())

    def _run_until_stop(self, command: str) -> CommandResult:
        timeout = self._time_left()
        if timeout <= 0:
            return CommandResult(command, None, False, "not run: the daemon is stopping", 0.0)
        return self._run(command, timeout)

    @staticmethod
    def intended_line(block: Block) -> str | None:
        for step in block.steps:
            if step.kind is StepKind.HOSTS_DENY:
                probe = block.probe
                return hosts_deny_entry(step.template, probe.source, probe.port, probe.mode)
        return None

    def _step(self, step: Step, block: Block, duration: float | None, keeper: BanKeeper | None,
              failed: list[str]) -> str | None:
        """Carry out one step and log it the 1.2 way; the error text, or None when it worked.
        The lines said of a failure go to `failed` too."""
        probe = block.probe
        target = str(probe.source)

        def fail(line: str) -> None:
            self._log(line)
            failed.append(line)

        if step.kind is StepKind.NATIVE:
            assert keeper is not None
            return None if keeper.ban_native(probe.source, duration, failed) else "native ban failed"
        if step.kind is StepKind.HOSTS_DENY:
            line = hosts_deny_entry(step.template, probe.source, probe.port, probe.mode)
            try:
                if keeper is not None:
                    added = keeper.add_line(probe.source, line, self.clock())
                else:
                    added = self.hosts_deny.add(line)
                if not added:
                    self._verbose(messages.hosts_deny_present(target))
            except (OSError, ValueError, HostsDenyError) as error:
                admin_line, security_line = messages.hosts_deny_failed(self.hosts_deny.path, target,
                                                                       str(error))
                if self.failures is not None:  # said once a minute per file, counted, in status
                    self.failures.failed(HOSTS_DENY, self.hosts_deny.path, str(error))
                else:
                    self._log(admin_line)
                failed.append(admin_line)  # the admin who asked is told why, each time
                fail(security_line)  # which host is not blocked: said every time
                return str(error)
            self._log(messages.blocked_via_wrappers(target, line))
            return None
        command = substitute(step.template, probe.source, probe.port, probe.mode)
        started = block.started
        if step.kind is StepKind.ROUTE and started is not None and started.pid >= 0:
            # The fast lane started this very command (service.lane checks it renders the same).
            # Already running: seen through (and reaped) even past the stop's deadline.
            timeout = max(self._time_left(), 0.001)
            try:
                result = wait_shell(command, started.pid, started.pipe, started.at, timeout)
            finally:
                started.reaped()
        else:
            result = self._run_until_stop(command)
        if step.kind is StepKind.ROUTE:
            if result.ok:
                self._log(messages.blocked_via_route(target, command))
                return None
            fail(messages.route_failed(target, result.failure()))
            return result.failure()
        if result.ok:
            self._log(messages.external_command(target, command))
            return None
        fail(messages.command_failed(target, result.failure()))
        return result.failure()

