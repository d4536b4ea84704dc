"""The classic responder: 1.2's step order and log lines, and honest success (exit status read)."""

from __future__ import annotations

from ipaddress import ip_address

from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import KIND_CONNECT, Mode, Probe
from portsentry.responders.classic import ClassicResponder
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult

SCANNER = ip_address("198.18.0.2")


class Runner:
    def __init__(self, failing: tuple[str, ...] = ()) -> None:
        self.commands: list[str] = []
        self.failing = failing

    def __call__(self, command: str, timeout: float) -> CommandResult:
        self.commands.append(command)
        code = 1 if any(word in command for word in self.failing) else 0
        return CommandResult(command, code, False, "nope" if code else "", 0.001)


def responder(tmp_path, runner: Runner, lines: list[str]) -> ClassicResponder:
    return ClassicResponder(HostsDeny(str(tmp_path / "hosts.deny")), lines.append, 5.0, runner=runner)


def block(*steps: Step) -> Block:
    return Block(Probe(source=SCANNER, port=111, mode=Mode.TCP, kind=KIND_CONNECT), steps)


ALL = (Step(StepKind.RUN_CMD, "notify $TARGET$ $PORT$ $MODE$"), Step(StepKind.HOSTS_DENY, "ALL: $TARGET$"),
       Step(StepKind.ROUTE, "route add $TARGET$"))


def test_steps_run_in_order_with_substitution_and_1_2_lines(tmp_path):
    runner, lines = Runner(), list[str]()
    assert responder(tmp_path, runner, lines).carry_out(block(*ALL), None)
    assert runner.commands == ["notify 198.18.0.2 111 tcp", "route add 198.18.0.2"]
    assert lines == [
        'attackalert: External command run for host: 198.18.0.2 using command: "notify 198.18.0.2 111 tcp"',
        'attackalert: Host 198.18.0.2 has been blocked via wrappers with string: "ALL: 198.18.0.2"',
        "attackalert: Host 198.18.0.2 has been blocked via dropped route using command: "
        '"route add 198.18.0.2"',
    ]
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.2\n"


def test_a_failing_route_is_logged_as_failure_but_hosts_deny_still_blocks(tmp_path):
    runner, lines = Runner(failing=("route",)), list[str]()
    assert responder(tmp_path, runner, lines).carry_out(block(*ALL[1:]), None)
    assert lines[-1].startswith("adminalert: ERROR: There was an error trying to block host (system fail) "
                                '198.18.0.2: "route add 198.18.0.2" exit status 1: nope')


def test_all_blocking_steps_failing_means_not_blocked(tmp_path):
    runner, lines = Runner(failing=("route",)), list[str]()
    assert not responder(tmp_path, runner, lines).carry_out(block(ALL[2]), None)


def test_block_2_success_is_the_command_s_exit_status(tmp_path):
    lines: list[str] = []
    assert responder(tmp_path, Runner(), lines).carry_out(block(ALL[0]), None)
    assert not responder(tmp_path, Runner(failing=("notify",)), lines).carry_out(block(ALL[0]), None)


def test_past_the_stops_deadline_no_command_starts_and_the_block_says_why(tmp_path):
    import time

    runner, lines = Runner(), list[str]()
    classic = responder(tmp_path, runner, lines)
    classic.stop_by(time.monotonic() - 0.1)
    assert not classic.carry_out(block(Step(StepKind.ROUTE, "route add $TARGET$")), None)
    assert runner.commands == []
    assert "not run: the daemon is stopping" in lines[-1]
