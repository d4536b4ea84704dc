"""Bans and lifts the command line wrote to the store directly (`block --file`, or `block` and
`unblock` while the daemon is down) are reported by the daemon, as `ban` and `unban` events and
in the ban metrics, once each, also across restarts (docs/events.md)."""

from __future__ import annotations

import json
from ipaddress import ip_address
from pathlib import Path

from portsentry.bans.bulk import ManualSteps, block_many, unblock_many
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.others import report_others
from portsentry.bans.store import BanStore
from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import Mode, Probe
from portsentry.journal.events import EventLog
from portsentry.journal.telemetry import NullMetrics, Telemetry
from portsentry.responders.backend import BackendError
from portsentry.responders.classic import ClassicResponder
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult
from portsentry.service.maintenance import Maintenance
from tests.unit.bans.test_lifecycle import Kernel
from tests.unit.journal.test_events import assert_valid

A, B, C = ip_address("198.18.0.2"), ip_address("198.18.0.3"), ip_address("198.18.0.4")
T0 = 1_700_000_000.0


class Counted(NullMetrics):
    def __init__(self) -> None:
        self.bans: list[str] = []
        self.unbans: list[str] = []

    def ban(self, backend: str) -> None:
        self.bans.append(backend)

    def unban(self, reason: str) -> None:
        self.unbans.append(reason)


def ran(command: str, timeout: float) -> CommandResult:
    return CommandResult(command, 0, False, "", 0.0)


def command_line(tmp_path: Path, kernel: Kernel) -> BanManager:
    """As service.admin.Admin.open makes it: no event log, its changes left for the daemon."""
    return BanManager(BanStore(str(tmp_path / "bans.sqlite3"), reports=False), kernel,
                      HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(base=600), list[str]().append)


def daemon(tmp_path: Path, kernel: Kernel) -> tuple[BanManager, Counted]:
    metrics = Counted()
    telemetry = Telemetry(EventLog(str(tmp_path / "events.jsonl")), metrics)
    bans = BanManager(BanStore(str(tmp_path / "bans.sqlite3")), kernel,
                      HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(base=600), list[str]().append,
                      runner=ran, telemetry=telemetry)
    return bans, metrics


def logged(tmp_path: Path) -> list[tuple[object, ...]]:
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for event in events:
        assert_valid(event)
    return [(e["event"], e["src"], e["reason"], e.get("backend"), e.get("duration"), e.get("count"))
            for e in events]


def test_bulk_bans_and_lifts_are_reported_once_also_after_a_restart(tmp_path):
    kernel = Kernel()
    cli = command_line(tmp_path, kernel)
    block_many(cli, ManualSteps(), [A, B], T0, 3600.0, ran)
    unblock_many(cli, ManualSteps(), [B], T0 + 5, ran)
    cli.store.close()
    bans, metrics = daemon(tmp_path, kernel)
    assert report_others(bans) == 3
    assert logged(tmp_path) == [
        ("ban", "198.18.0.2", "manual block", "fake", 3600, 0),
        ("ban", "198.18.0.3", "manual block", "fake", 3600, None),  # lifted since: count unknown
        ("unban", "198.18.0.3", "unblocked by admin", None, None, None),
    ]
    assert (metrics.bans, metrics.unbans) == (["fake", "fake"], ["unblocked by admin"])
    assert report_others(bans) == 0
    bans.store.close()
    again, metrics = daemon(tmp_path, kernel)
    assert report_others(again) == 0
    assert len(logged(tmp_path)) == 3 and metrics.bans == []


def test_the_daemon_s_own_bans_and_lifts_are_not_reported_twice(tmp_path):
    bans, metrics = daemon(tmp_path, Kernel())
    responder = ClassicResponder(bans.hosts_deny, list[str]().append, 1.0, runner=ran, clock=lambda: T0)
    manual = Probe(source=A, port=0, mode=Mode.TCP, kind="manual block")
    assert bans.enforce(Block(manual, (Step(StepKind.NATIVE, ""),)), responder, 60.0, now=T0)
    assert bans.lift(A, T0 + 1, "unblocked by admin")
    assert report_others(bans) == 0
    assert [event[0] for event in logged(tmp_path)] == ["ban", "unban"]
    assert metrics.bans == ["fake"]


class Refusing(Kernel):
    def add(self, address, timeout):
        raise BackendError("nft: no such table")


def test_a_block_by_hand_whose_every_step_failed_is_not_reported(tmp_path):
    cli = command_line(tmp_path, Refusing())
    responder = ClassicResponder(cli.hosts_deny, list[str]().append, 1.0, runner=ran, clock=lambda: T0)
    manual = Probe(source=C, port=0, mode=Mode.TCP, kind="manual block")
    assert not cli.enforce(Block(manual, (Step(StepKind.NATIVE, ""),)), responder, 60.0, now=T0)
    bans, metrics = daemon(tmp_path, Kernel())
    assert report_others(bans) == 2
    assert logged(tmp_path) == [] and metrics.bans == metrics.unbans == []


def test_a_ban_made_while_the_daemon_was_down_is_said_before_its_expiry(tmp_path):
    kernel = Kernel()
    cli = command_line(tmp_path, kernel)
    block_many(cli, ManualSteps(), [A], T0, 10.0, ran)
    bans, _metrics = daemon(tmp_path, kernel)
    maintenance = Maintenance(bans, frozenset, list[object]().append, print, clock=lambda: T0 + 60)
    maintenance.run_once()
    assert [(event[0], event[2]) for event in logged(tmp_path)] == [
        ("ban", "manual block"), ("unban", "ban expired")]
