"""`portsentry block ADDR --for 2h` of an address banned already changes its ban's end and
nothing else: no second hosts.deny line said, no KILL_ROUTE run again, no ban counted."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from portsentry.bans.connection import describe_expiry
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.others import report_others
from portsentry.bans.records import Ban, TimeChange, time_change
from portsentry.bans.store import BanStore
from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import Mode, Probe
from portsentry.journal.telemetry import Telemetry
from portsentry.responders.classic import ClassicResponder, StepFailure
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult
from tests.unit.bans.test_lifecycle import Kernel
from tests.unit.bans.test_others import Counted, command_line, daemon

A = ip_address("198.18.0.2")
T0 = 1_700_000_000.0


def _ban(expires: float | None) -> Ban:
    return Ban(A, "scan: 1/tcp", "tcp", 1, T0, T0, 1, expires, 1, None, ())


@pytest.mark.parametrize("expires,duration,new_end", [
    (T0 + 3600, 7200.0, T0 + 100 + 7200),  # longer: the asked end
    (T0 + 86400, 7200.0, T0 + 86400),  # shorter than what is left: the later end holds
    (None, 7200.0, None),  # forever stays forever
    (T0 + 3600, None, None),  # forever asked
])
def test_the_later_end_holds(expires, duration, new_end):
    change = time_change(_ban(expires), duration, T0 + 100)
    assert change == TimeChange(A, expires, None if duration is None else T0 + 100 + duration, new_end)
    assert change.changed == (new_end != expires)


class Logged:
    def __init__(self, tmp_path) -> None:
        self.lines: list[str] = []
        self.commands: list[str] = []
        self.kernel = Kernel()
        self.metrics = Counted()
        self.bans = BanManager(BanStore(str(tmp_path / "bans.sqlite3")), self.kernel,
                               HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(), self.lines.append,
                               runner=self.run, telemetry=Telemetry(None, self.metrics))
        self.responder = ClassicResponder(self.bans.hosts_deny, self.lines.append, 1.0, runner=self.run)

    def run(self, command: str, timeout: float) -> CommandResult:
        self.commands.append(command)
        return CommandResult(command, 0, False, "", 0.0)

    def block(self, duration: float | None, now: float, failed: list[StepFailure] | None = None) -> object:
        steps = (Step(StepKind.NATIVE, ""), Step(StepKind.HOSTS_DENY, "ALL: $TARGET$"),
                 Step(StepKind.ROUTE, "route add $TARGET$"), Step(StepKind.RUN_CMD, "notify $TARGET$"))
        block = Block(Probe(source=A, port=0, mode=Mode.TCP, kind="manual block"), steps)
        return self.bans.block_by_hand(block, self.responder, duration, now, [] if failed is None else failed)


def test_a_block_of_a_banned_address_moves_its_end_and_runs_no_step_again(tmp_path):
    host = Logged(tmp_path)
    assert host.block(3600.0, T0) is True
    assert host.commands == ["route add 198.18.0.2", "notify 198.18.0.2"]
    assert host.metrics.bans == ["fake"]
    host.lines.clear()
    change = host.block(7200.0, T0 + 10)
    assert change == TimeChange(A, T0 + 3600, T0 + 10 + 7200, T0 + 10 + 7200)
    # One line, naming both ends; no "has been blocked via wrappers" for a line never written.
    assert host.lines == [f"adminalert: 198.18.0.2 was already blocked: its ban now lasts "
                          f"{describe_expiry(T0 + 7210)} instead of {describe_expiry(T0 + 3600)}"]
    assert host.commands == ["route add 198.18.0.2", "notify 198.18.0.2"]  # KILL_ROUTE ran once
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.2\n"
    assert host.metrics.bans == ["fake"]  # no new ban counted
    ban = host.bans.store.get(A)
    assert ban is not None and ban.expires == T0 + 7210 and ban.count == 1 and ban.routed
    assert ban.reason == "manual block" and ban.hosts_deny_line == "ALL: 198.18.0.2"
    # The kernel times its entries itself: it gets the new end (the time left from then on).
    assert host.kernel.held[A] == 7200.0
    assert [(c.kind, c.expires) for c in host.bans.store.changes(0)][-1] == ("extend", T0 + 7210)


def test_a_shorter_block_of_a_banned_address_changes_nothing_and_says_so(tmp_path):
    host = Logged(tmp_path)
    assert host.block(None, T0) is True
    host.lines.clear()
    last = host.bans.store.last_change()
    change = host.block(7200.0, T0 + 10)
    assert isinstance(change, TimeChange) and not change.changed
    assert host.lines == [f"adminalert: 198.18.0.2 was already blocked forever, not shorter than asked "
                          f"({describe_expiry(T0 + 7210)}): its ban stays as it is (unblock it first "
                          "for a shorter one)"]
    assert host.bans.store.last_change() == last  # nothing written
    assert host.commands == ["route add 198.18.0.2", "notify 198.18.0.2"]


def test_a_block_after_the_ban_ended_is_a_new_ban(tmp_path):
    host = Logged(tmp_path)
    assert host.block(60.0, T0) is True
    assert host.block(60.0, T0 + 120) is True
    assert host.commands.count("route add 198.18.0.2") == 2 and host.metrics.bans == ["fake", "fake"]


def test_a_failed_kernel_retime_is_said(tmp_path):
    from tests.unit.bans.test_failed_steps import Refusing

    host = Logged(tmp_path)
    assert host.block(60.0, T0) is True
    host.bans.backend = Refusing()
    failed: list[StepFailure] = []
    assert isinstance(host.block(7200.0, T0 + 10, failed), TimeChange)
    assert [failure.kind for failure in failed] == [StepKind.NATIVE]


def test_a_time_change_made_while_the_daemon_was_down_is_reported_but_not_counted_as_a_ban(tmp_path):
    kernel = Kernel()
    cli = command_line(tmp_path, kernel)
    responder = ClassicResponder(cli.hosts_deny, list[str]().append, 1.0)
    block = Block(Probe(source=A, port=0, mode=Mode.TCP, kind="manual block"), (Step(StepKind.NATIVE, ""),))
    assert cli.block_by_hand(block, responder, 60.0, T0, []) is True
    assert isinstance(cli.block_by_hand(block, responder, 7200.0, T0 + 1, []), TimeChange)
    cli.store.close()
    bans, metrics = daemon(tmp_path, kernel)
    assert report_others(bans) == 2
    assert metrics.bans == ["fake"]
