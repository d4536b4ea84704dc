"""The daemon's stop: no thread it started goes on using the ban store, or running commands for
bans, once it has stopped."""

from __future__ import annotations

import threading
import time
from ipaddress import ip_address
from pathlib import Path

from portsentry.responders.shell import CommandResult
from tests.unit.bans.test_lifecycle import manager
from tests.unit.service.daemons import bare_daemon


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
