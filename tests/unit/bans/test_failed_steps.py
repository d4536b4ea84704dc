"""A ban or lift goes on when one of its steps fails, and says which failed: the lines the log
gets come back to the caller (StepFailure), so that an admin's `block` and `unblock` can show
them and end with exit 1 instead of "done"."""

from __future__ import annotations

import os
from ipaddress import ip_address

from portsentry.bans.lifecycle import BanManager
from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import Mode, Probe
from portsentry.responders.backend import BackendError
from portsentry.responders.classic import ClassicResponder, StepFailure
from portsentry.responders.shell import CommandResult
from tests.unit.bans.test_lifecycle import Kernel, manager

A = ip_address("198.18.0.2")
ROUTE = "route add $TARGET$"
DENY = "ALL: $TARGET$"
ROUTE_FAILED = ('adminalert: ERROR: There was an error trying to block host (system fail) 198.18.0.2: '
                '"route add 198.18.0.2" exit status 7: SIOCADDRT: Network is unreachable')


def failing_shell(command: str, timeout: float) -> CommandResult:
    return CommandResult(command, 7, False, "SIOCADDRT: Network is unreachable", 0.0)


def manual(*steps: Step) -> Block:
    return Block(Probe(source=A, port=0, mode=Mode.TCP, kind="manual block"), steps)


def responder(bans: BanManager, lines: list[str]) -> ClassicResponder:
    return ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=failing_shell, clock=lambda: 10.0)


def test_a_block_with_a_failed_kill_route_is_made_and_says_which_step_failed(tmp_path):
    bans, kernel, lines, _commands = manager(tmp_path)
    failed: list[StepFailure] = []
    block = manual(Step(StepKind.NATIVE, ""), Step(StepKind.HOSTS_DENY, DENY), Step(StepKind.ROUTE, ROUTE))
    assert bans.enforce(block, responder(bans, lines), 60.0, now=10.0, failed=failed)
    assert failed == [StepFailure(StepKind.ROUTE, (ROUTE_FAILED,))]
    assert ROUTE_FAILED in lines  # the log has the same words
    assert A in kernel.held and (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.2\n"
    assert bans.store.get(A) is not None


def test_a_refused_hosts_deny_says_why_to_the_caller_each_time(tmp_path):
    bans, _kernel, lines, _commands = manager(tmp_path)
    deny = tmp_path / "hosts.deny"
    deny.write_text("")
    os.chmod(deny, 0o666)  # world-writable: refused
    failed: list[StepFailure] = []
    block = manual(Step(StepKind.NATIVE, ""), Step(StepKind.HOSTS_DENY, DENY))
    assert bans.enforce(block, responder(bans, lines), 60.0, now=10.0, failed=failed)
    [failure] = failed
    assert failure.kind is StepKind.HOSTS_DENY
    assert failure.lines[0].startswith(f"adminalert: cannot open hosts.deny file: {deny} for blocking. (")
    assert "world-writable" in failure.lines[0]
    assert failure.lines[1] == "securityalert: ERROR: There was an error trying to block host 198.18.0.2"


class Refusing(Kernel):
    def add(self, address, timeout):
        raise BackendError("nft: no such table")

    def remove(self, address):
        raise BackendError("nft: no such table")


def test_a_failed_native_ban_is_said_to_the_caller(tmp_path):
    bans, _kernel, lines, _commands = manager(tmp_path)
    bans.backend = Refusing()
    failed: list[StepFailure] = []
    block = manual(Step(StepKind.NATIVE, ""), Step(StepKind.HOSTS_DENY, DENY))
    assert bans.enforce(block, responder(bans, lines), 60.0, now=10.0, failed=failed)
    assert failed == [StepFailure(StepKind.NATIVE, ("adminalert: ERROR: There was an error trying to block "
                                                    "host 198.18.0.2 via fake: nft: no such table",))]


def test_a_block_whose_every_step_failed_says_each(tmp_path):
    bans, _kernel, lines, _commands = manager(tmp_path)
    bans.backend = Refusing()
    failed: list[StepFailure] = []
    block = manual(Step(StepKind.NATIVE, ""), Step(StepKind.ROUTE, ROUTE))
    assert not bans.enforce(block, responder(bans, lines), 60.0, now=10.0, failed=failed)
    assert [failure.kind for failure in failed] == [StepKind.NATIVE, StepKind.ROUTE]
    assert bans.store.get(A) is None  # dropped again, as before


def banned_everywhere(bans: BanManager, lines: list[str]) -> None:
    """A's ban, in the kernel and by KILL_ROUTE, every step of it done."""
    assert bans.enforce(manual(Step(StepKind.NATIVE, ""), Step(StepKind.ROUTE, ROUTE)),
                        ClassicResponder(bans.hosts_deny, lines.append, 1.0,
                                         runner=lambda c, t: CommandResult(c, 0, False, "", 0.0)),
                        60.0, now=10.0)


def test_a_lift_whose_steps_fail_is_recorded_and_says_which_failed(tmp_path):
    bans, _kernel, lines, _commands = manager(tmp_path, undo="route del $TARGET$")
    banned_everywhere(bans, lines)
    bans.backend = Refusing()
    bans.run = bans._run = failing_shell
    failed: list[StepFailure] = []
    assert bans.lift(A, 20.0, "unblocked by admin", failed=failed)
    assert [failure.kind for failure in failed] == [StepKind.ROUTE, StepKind.NATIVE]
    assert failed[0].lines == ('adminalert: ERROR: There was an error trying to run command (system fail) '
                               '198.18.0.2: "route del 198.18.0.2" exit status 7: SIOCADDRT: Network is '
                               'unreachable',)
    assert failed[1].lines == ("adminalert: ERROR: There was an error trying to unblock host 198.18.0.2: "
                               "nft: no such table",)
    assert all(line in lines for failure in failed for line in failure.lines)
    assert bans.store.get(A) is None and bans.kernel_unsure


def test_a_lift_that_worked_everywhere_reports_nothing(tmp_path):
    bans, _kernel, lines, _commands = manager(tmp_path, undo="route del $TARGET$")
    banned_everywhere(bans, lines)
    failed: list[StepFailure] = []
    assert bans.lift(A, 20.0, "unblocked by admin", failed=failed)
    assert failed == []
