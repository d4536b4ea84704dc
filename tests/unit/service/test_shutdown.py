"""The daemon's stop: no thread it started goes on using the ban store, or running commands for
bans, once it has stopped."""

from __future__ import annotations

import threading
import time
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from portsentry.core.actions import Block, Decision
from portsentry.core.engine import EngineSettings
from portsentry.core.probe import KIND_CONNECT, KIND_SYN, Mode, Probe
from portsentry.responders.shell import CommandResult
from tests.unit.bans.test_lifecycle import manager
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
