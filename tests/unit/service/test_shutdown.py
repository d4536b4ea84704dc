"""The daemon's stop: no thread it started goes on using the ban store, or running commands for
bans, once it has stopped."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.core.actions import Block, Decision
from portsentry.core.engine import EngineSettings
from portsentry.core.probe import KIND_CONNECT, KIND_SYN, Mode, Probe
from portsentry.responders.backend import Guarded
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult
from portsentry.service.kernelbans import KernelBans
from portsentry.service.maintenance import Findings
from tests.unit.bans.test_lifecycle import Kernel, manager
from tests.unit.service.daemons import bare_daemon

SCANNER = ip_address("198.18.0.2")


def test_a_stop_during_the_kill_route_re_runs_after_a_reboot_leaves_the_rest_for_the_next_start(
        tmp_path: Path) -> None:
    # After a reboot KILL_ROUTE is run again for every stored ban, on a thread of its own, four at
    # a time. The stop did not tell it: it went on after the daemon had stopped and the store was
    # closed (read as "still banned": the lesser harm), and Python's exit waited for every queued
    # re-run, each up to COMMAND_TIMEOUT, until systemd's stop timeout killed the process.
    bans, _kernel, _lines, _commands = manager(tmp_path, route="ip route add blackhole $TARGET$")
    for n in range(10):
        bans.remember(ip_address(f"198.18.6.{n}"), reason="scan", mode="tcp", port=1, now=1.0,
                      duration=None, hosts_deny_line=None, native=False, route=True)
    ran: list[str] = []
    started, release = threading.Semaphore(0), threading.Event()

    def slow_route(command: str, timeout: float) -> CommandResult:
        ran.append(command)
        started.release()
        release.wait(5)
        return CommandResult(command, 0, False, "", 0.0)

    bans.run = slow_route
    daemon, _said = bare_daemon(tmp_path, bans=bans)
    daemon.open()
    for _ in range(4):
        assert started.acquire(timeout=5)  # four re-runs under way
    stopping = threading.Thread(target=daemon.shutdown)
    stopping.start()
    time.sleep(0.2)
    release.set()  # the four under way finish; the six waiting must not start
    stopping.join(10)
    assert not stopping.is_alive()
    bans.store.close()  # as `portsentry run` does once the daemon has stopped
    time.sleep(0.3)
    assert len(ran) == 4
    assert not (tmp_path / "kernel-id").exists()  # the next start re-runs them all


def _blocking(daemon: Any, route: str = "true $TARGET$", run_cmd: str | None = None) -> None:
    daemon.engine.update_settings(EngineSettings(block_tcp=1, kill_route=route, kill_run_cmd=run_cmd))


def test_a_block_decided_as_the_stop_ends_is_said_not_started(tmp_path: Path) -> None:
    # A block under way failed at the stop; the hit that had waited for it was decided then,
    # and its new block was queued after the responder threads were gone: never run, never said.
    daemon, said = bare_daemon(tmp_path)
    _blocking(daemon)
    started, release = threading.Event(), threading.Event()

    def failing(block: Block) -> bool:
        started.set()
        release.wait(5)
        return False

    daemon._blocks._carry_out = failing
    daemon.open()
    daemon.perform(daemon.engine.observe(Probe(SCANNER, 1, Mode.TCP, KIND_CONNECT), 1000.0).actions)
    assert started.wait(5)
    waited = daemon.engine.observe(Probe(SCANNER, 2, Mode.STCP, KIND_SYN), 1000.1)
    assert waited.decision is Decision.ALREADY_BLOCKED  # held until the block's outcome
    stopping = threading.Thread(target=daemon.shutdown)
    stopping.start()
    time.sleep(0.2)
    release.set()
    stopping.join(10)
    assert not stopping.is_alive()
    lines = said.getvalue().splitlines()
    assert "attackalert: ERROR: Could not block host 198.18.0.2 !!" in lines
    assert any("block(s) not started: the daemon is stopping" in line for line in lines), lines
    assert daemon._blocks.waiting == 0


class GuardsKernel(Kernel):
    def __init__(self, failure: Exception | None = None) -> None:
        super().__init__()
        self.failure = failure
        self.pushed = 0

    def first_probe_bans(self) -> bool:
        return True

    def set_guards(self, protect: Iterable[Guarded], nokernel: Iterable[Guarded]) -> None:
        if self.failure is not None:
            raise self.failure
        self.pushed += 1


def _with_kernel_bans(tmp_path: Path, kernel: GuardsKernel) -> tuple[Any, io.StringIO]:
    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=60), lambda _line: None)
    daemon, said = bare_daemon(tmp_path, bans=bans)
    daemon._kernel = KernelBans(bans, daemon.journal.log)
    return daemon, said


def test_guards_found_in_the_last_round_before_the_stop_are_pushed_not_an_internal_error(
        tmp_path: Path) -> None:
    # The maintenance thread's last Findings were applied at the very end of the stop, after
    # the admin workers had gone: pushing the kernel's guards to them raised, and the stop said
    # "internal error", and the guards (the kernel bans on its own while the daemon is away)
    # stayed as they were.
    kernel = GuardsKernel()
    daemon, said = _with_kernel_bans(tmp_path, kernel)
    daemon._call_on_main(lambda: daemon._apply(Findings()))
    daemon.shutdown()
    assert "internal error" not in said.getvalue(), said.getvalue()
    assert kernel.pushed == 1


def test_a_failure_pushing_the_kernels_guards_on_an_admin_worker_is_said(tmp_path: Path) -> None:
    # The push ran on the admin pool and its Future was never looked at: anything but the
    # backend's own errors vanished, and the kernel went on sparing the old sources, unsaid.
    kernel = GuardsKernel(failure=ValueError("bad guard"))
    daemon, said = _with_kernel_bans(tmp_path, kernel)
    daemon._apply(Findings())
    daemon._admin.shutdown(wait=True)
    assert "ValueError('bad guard')" in said.getvalue(), said.getvalue()


def test_a_block_whose_commands_all_hang_at_the_stop_ends_within_one_command_timeout(
        tmp_path: Path) -> None:
    # KILL_ROUTE, then KILL_RUN_CMD, each hanging until COMMAND_TIMEOUT: the stop waited for
    # both, twice COMMAND_TIMEOUT (60 s by default), past systemd's and the SysV script's 45 s,
    # and the SIGKILL then lost the last lines and left the command running.
    daemon, said = bare_daemon(tmp_path)  # COMMAND_TIMEOUT 1 s
    _blocking(daemon, run_cmd="notify $TARGET$")
    started = threading.Event()
    given: list[float] = []

    def hanging(command: str, timeout: float) -> CommandResult:
        given.append(timeout)
        started.set()
        time.sleep(timeout)
        return CommandResult(command, -15, True, "", timeout)

    daemon.responder._run = hanging
    daemon.open()
    daemon.perform(daemon.engine.observe(Probe(SCANNER, 1, Mode.TCP, KIND_CONNECT), 1000.0).actions)
    assert started.wait(5)
    time.sleep(0.3)
    began = time.monotonic()
    daemon.shutdown()
    took = time.monotonic() - began
    # The route's last 0.7 s, then the command gets what is left of one COMMAND_TIMEOUT (it
    # took 1.7 s: the whole second besides).
    assert took < 1.35, (took, given)
    assert len(given) <= 2 and "timed out" in said.getvalue()
