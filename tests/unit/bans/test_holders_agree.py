"""Every holder of a ban (the store, the kernel set) keeps the same end for it: a ban the store
lists must be in force in the kernel for as long as the store lists it."""

from __future__ import annotations

from ipaddress import ip_address

from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import KIND_SYN, Mode, Probe
from portsentry.responders.classic import ClassicResponder
from tests.unit.bans.test_lifecycle import manager

A = ip_address("198.18.0.2")


def native_block(source=A) -> Block:
    return Block(Probe(source=source, port=0, mode=Mode.TCP, kind=KIND_SYN), (Step(StepKind.NATIVE, ""),))


def test_a_shorter_block_of_a_banned_address_leaves_the_kernel_timeout_at_the_stored_end(tmp_path):
    # `portsentry block A --for 60` while A is banned for an hour: the store keeps the later end
    # (the longer ban holds), but the kernel was given 60 s, so A was let in again after a minute
    # while `list` showed it banned for another 59 and the engine took its scans as
    # "already blocked".
    bans, kernel, lines, _commands = manager(tmp_path, base=3600)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, clock=lambda: 100.0)
    assert bans.enforce(native_block(), responder, duration=3600.0, now=0.0)
    assert bans.enforce(native_block(), responder, duration=60.0, now=100.0)
    ban = bans.store.get(A)
    assert ban is not None and ban.expires == 3600.0
    assert kernel.held[A] == 3500.0


def test_a_timed_block_of_a_ban_for_ever_leaves_the_kernel_element_without_timeout(tmp_path):
    bans, kernel, lines, _commands = manager(tmp_path)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, clock=lambda: 100.0)
    assert bans.enforce(native_block(), responder, duration=None, now=0.0)
    assert bans.enforce(native_block(), responder, duration=60.0, now=100.0)
    ban = bans.store.get(A)
    assert ban is not None and ban.expires is None
    assert kernel.held[A] is None


def test_a_longer_block_lengthens_the_kernel_timeout(tmp_path):
    bans, kernel, lines, _commands = manager(tmp_path)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, clock=lambda: 100.0)
    assert bans.enforce(native_block(), responder, duration=60.0, now=0.0)
    assert bans.enforce(native_block(), responder, duration=7200.0, now=10.0)
    assert kernel.held[A] == 7200.0


def test_a_wall_clock_set_back_gives_the_kernel_the_time_the_store_still_lists(tmp_path):
    # The kernel times set elements on a clock that does not jump; the store on the wall clock.
    # Set back by half an hour (an NTP step, `date -s`), the store listed A for half an hour
    # after the kernel had let it in again, and the engine took A's scans as "already blocked".
    from portsentry.service.maintenance import Maintenance

    bans, kernel, lines, _commands = manager(tmp_path, base=3600)
    wall, mono = [100_000.0], [50.0]
    maintenance = Maintenance(bans, frozenset, list[object]().append, print,
                              clock=lambda: wall[0], monotonic=lambda: mono[0])
    bans.remember(A, reason="scan", mode="tcp", port=1, now=100_000.0, duration=3600.0,
                  hosts_deny_line=None, native=True)
    assert bans.ban_native(A, 3600.0)
    forever = ip_address("198.18.0.3")
    bans.remember(forever, reason="scan", mode="tcp", port=1, now=100_000.0, duration=None,
                  hosts_deny_line=None, native=True)
    assert bans.ban_native(forever, None)
    wall[0], mono[0] = 100_001.0, 51.0
    maintenance.run_once()
    assert kernel.held == {A: 3600.0, forever: None}  # the clocks agree: nothing to do
    wall[0], mono[0] = 100_002.0 - 1800, 52.0
    maintenance.run_once()
    assert kernel.held == {A: 3600.0 - 2 + 1800, forever: None}
    assert lines[-1] == "adminalert: the clock was set back: 2 bans given their time left again in fake"
    # Forward (a suspended host resuming, a clock set ahead): the kernel's elements outlast the
    # store's end, and the expiry lifts them at it, so nothing is re-timed.
    kernel.held[A] = 1.0
    wall[0], mono[0] = 200_000.0, 53.0
    maintenance.run_once()
    assert A not in kernel.held and bans.store.get(A) is None


def test_a_failed_block_of_an_address_already_banned_leaves_its_ban_on_record(tmp_path):
    # KILL_ROUTE alone (1.2's `route add -host $TARGET$ reject`): `portsentry block A` on a banned
    # A fails with "File exists", and dropping "the record made before trying" lifted A's ban
    # from the store while its route stayed: nothing listed it and KILL_ROUTE_UNDO never ran.
    from portsentry.responders.shell import CommandResult

    bans, _kernel, lines, commands = manager(tmp_path, undo="ip route del blackhole $TARGET$")

    def route(command: str, timeout: float) -> CommandResult:
        commands.append(command)
        exists = commands.count(command) > 1 and command.startswith("ip route add")
        return CommandResult(command, 2 if exists else 0, False, "RTNETLINK answers: File exists", 0.0)

    bans._run = route
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=route, clock=lambda: 100.0)
    block = Block(Probe(source=A, port=0, mode=Mode.TCP, kind=KIND_SYN),
                  (Step(StepKind.ROUTE, "ip route add blackhole $TARGET$"),))
    assert bans.enforce(block, responder, duration=3600.0, now=0.0)
    assert not bans.enforce(block, responder, duration=60.0, now=100.0)
    ban = bans.store.get(A)
    assert ban is not None and ban.active(100.0) and ban.routed and ban.expires == 3600.0
    assert bans.expire(3600.0) == [A]
    assert commands[-1] == "ip route del blackhole 198.18.0.2"


def test_a_lift_removes_every_line_of_ours_for_the_address_not_only_the_last_one(tmp_path):
    # KILL_HOSTS_DENY with $PORT$ (or $MODE$): a scan's ban at port 22 wrote one line, a block
    # by hand (port 0) or a fleet peer's longer ban of the same address another, and the ban's
    # record kept only the last. The expiry removed that one; the first stayed in hosts.deny for
    # ever, denying the host with no ban left to list or lift.
    bans, _kernel, lines, _commands = manager(tmp_path)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, clock=lambda: 100.0)

    def block(port: int) -> Block:
        return Block(Probe(source=A, port=port, mode=Mode.TCP, kind=KIND_SYN),
                     (Step(StepKind.HOSTS_DENY, "ALL: $TARGET$ # port $PORT$"),))

    assert bans.enforce(block(22), responder, duration=60.0, now=0.0)
    assert bans.enforce(block(0), responder, duration=3600.0, now=10.0)
    deny = tmp_path / "hosts.deny"
    assert deny.read_text() == "ALL: 198.18.0.2 # port 22\nALL: 198.18.0.2 # port 0\n"
    assert bans.expire(3610.0) == [A]
    assert deny.read_text() == ""
    assert bans.store.stale_lines(3610.0) == set()
