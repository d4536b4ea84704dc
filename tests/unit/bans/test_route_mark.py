"""KILL_ROUTE_UNDO and the KILL_ROUTE re-run after a reboot concern only bans KILL_ROUTE ran for.

Before the mark, every lift ran KILL_ROUTE_UNDO: a fleet peer's ban, a kernel ban whose NFLOG copy
was lost and a native-only ban each had `route del ADDR` (or `iptables -D`) run on their lift,
taking out a route the admin or another tool had made for that address.
"""

from __future__ import annotations

import sqlite3
from ipaddress import ip_address

from portsentry.bans.adopt import RemoteBan, adopt_bans
from portsentry.bans.bulk import ManualSteps, block_many, unblock_many
from portsentry.bans.lifecycle import BanManager
from portsentry.bans.schema import MIGRATIONS, migrate
from portsentry.bans.store import ROUTE_MARK, BanStore
from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import KIND_SYN, Mode, Probe
from portsentry.responders.classic import ClassicResponder
from portsentry.responders.shell import CommandResult
from tests.unit.bans.test_lifecycle import manager, restart

UNDO = "route del $TARGET$"
ROUTE = "route add $TARGET$"
A, B, C, D = (ip_address(f"198.18.0.{n}") for n in (2, 3, 4, 5))


def _responder(bans: BanManager, lines: list[str], ran: list[str]) -> ClassicResponder:
    def run(command: str, timeout: float) -> CommandResult:
        ran.append(command)
        return CommandResult(command, 0, False, "", 0.0)

    return ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=run, clock=lambda: 10.0)


def test_only_a_ban_kill_route_ran_for_has_kill_route_undo_run_at_its_lift(tmp_path):
    bans, _kernel, lines, commands = manager(tmp_path, base=60, undo=UNDO, route=ROUTE)
    ran: list[str] = []
    responder = _responder(bans, lines, ran)
    routed = Block(Probe(source=A, port=79, mode=Mode.STCP, kind=KIND_SYN),
                   (Step(StepKind.NATIVE, ""), Step(StepKind.ROUTE, ROUTE)))
    native_only = Block(Probe(source=B, port=79, mode=Mode.STCP, kind=KIND_SYN), (Step(StepKind.NATIVE, ""),))
    assert bans.enforce(routed, responder, now=10.0)
    assert bans.enforce(native_only, responder, now=10.0)
    assert ran == [f"route add {A}"]
    adopt_bans(bans, [RemoteBan(C, None, "h2", "fleet: scan")], 11.0)  # a peer's ban
    assert bans.record_kernel_ban(D, "stcp", 79, 12.0)  # its NFLOG copy was lost
    for address in (A, B, C, D):
        assert bans.lift(address, 20.0, "unblocked by admin")
    assert commands == [f"route del {A}"]


def test_an_unblock_of_an_address_with_no_record_still_runs_kill_route_undo(tmp_path):
    # Banned before this store (by 1.2, or by hand): the admin's unblock undoes it as it always did.
    bans, _kernel, _lines, commands = manager(tmp_path, undo=UNDO)
    assert not bans.lift(A, 1.0, "unblocked by admin")
    assert commands == [f"route del {A}"]


def test_a_reboot_re_runs_kill_route_only_where_it_ran(tmp_path):
    bans, _kernel, _lines, commands = manager(tmp_path, route=ROUTE)
    bans.remember(A, reason="scan", mode="tcp", port=1, now=1.0, duration=100, hosts_deny_line=None,
                  native=False, route=True)
    # A peer's longer ban takes A over; KILL_ROUTE ran here all the same and its undo will run.
    adopt_bans(bans, [RemoteBan(A, None, "h2", "fleet: scan")], 1.5)
    assert bans.record_kernel_ban(B, "stcp", 79, 1.6)  # never ran KILL_ROUTE
    bans.remember(C, reason="manual block", mode="tcp", port=0, now=1.7, duration=None,
                  hosts_deny_line=None, native=True)  # made while KILL_ROUTE was unset
    restart(bans, 2.0, str(tmp_path / "kernel-id"))
    assert commands == [f"route add {A}"]


def test_block_file_marks_its_bans_and_unblock_file_undoes_only_those(tmp_path):
    bans, _kernel, _lines, _commands = manager(tmp_path)
    ran: list[str] = []

    def run(command: str, timeout: float) -> CommandResult:
        ran.append(command)
        return CommandResult(command, 0, False, "", 0.0)

    adopt_bans(bans, [RemoteBan(B, None, "h2", "fleet: scan")], 0.5)
    block_many(bans, ManualSteps(route=ROUTE, undo=UNDO), [A], 1.0, None, run)
    got = bans.store.get(A)
    assert got is not None and got.routed
    ran.clear()
    unblock_many(bans, ManualSteps(route=ROUTE, undo=UNDO), [A, B], 2.0, run)
    assert ran == [f"route del {A}"]


def test_bans_of_an_earlier_store_are_taken_as_routed_where_they_were_local(tmp_path):
    # Before the mark, every local ban got KILL_ROUTE again after a reboot and KILL_ROUTE_UNDO at
    # its lift; after the upgrade a local ban's route must still be undone.
    path = tmp_path / "bans.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for number, _description, script in MIGRATIONS:
        if number < 7:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
    db.execute("PRAGMA user_version = 6")
    insert = ("INSERT INTO bans (address, reason, mode, port, first_seen, last_seen, count, expires, "
              "offences, hosts_deny_line, backends, origin) VALUES (?, 'scan', 'tcp', 1, 1, 1, 1, NULL, "
              "1, NULL, ?, ?)")
    db.execute(insert, (str(A), '["nftables"]', "local"))
    db.execute(insert, (str(B), '["nftables"]', "h2"))
    db.execute(insert, (str(C), "[]", "local"))
    db.execute("COMMIT")
    db.close()
    with BanStore(str(path)) as store:
        marked = {address: store.get(address) for address in (A, B, C)}
        assert {a: (b.routed if b else None) for a, b in marked.items()} == {A: True, B: False, C: True}
        first = marked[A]
        assert first is not None and first.backends == ("nftables", ROUTE_MARK)
        assert {address for address, _port, _mode in store.active_routed(2.0)} == {A, C}
    db = sqlite3.connect(path)
    migrate(db)  # once only: the mark is not added twice
    assert db.execute("SELECT backends FROM bans WHERE address = ?", (str(A),)).fetchone() == (
        '["nftables","KILL_ROUTE"]',)
    db.close()


def _route_exists(ran: list[str]):
    """A runner whose `route add` fails as on a host whose route 1.2 made ("File exists")."""
    def run(command: str, timeout: float) -> CommandResult:
        ran.append(command)
        return CommandResult(command, 7 if command.startswith("route add") else 0, False,
                             "SIOCADDRT: File exists", 0.0)
    return run


def test_a_kill_route_that_failed_is_not_undone_at_the_lift(tmp_path):
    # A host 1.2 blocked keeps its route after the switch: our KILL_ROUTE for its next scan fails
    # ("SIOCADDRT: File exists") and hosts.deny holds the ban. Its expiry ran KILL_ROUTE_UNDO all
    # the same and took 1.2's route, a block for ever, away with ours.
    bans, _kernel, lines, commands = manager(tmp_path, base=60, undo=UNDO, route=ROUTE)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=_route_exists(commands),
                                 clock=lambda: 10.0)
    block = Block(Probe(source=A, port=111, mode=Mode.ATCP, kind=KIND_SYN),
                  (Step(StepKind.HOSTS_DENY, "ALL: $TARGET$ : DENY"), Step(StepKind.ROUTE, ROUTE)))
    assert bans.enforce(block, responder, now=10.0)  # held by hosts.deny
    held = bans.store.get(A)
    assert held is not None and not held.routed
    restart(bans, 20.0, str(tmp_path / "kernel-id"))  # nor is it run again after a reboot
    assert commands == [f"route add {A}"]
    assert bans.expire(100.0) == [A]
    assert commands == [f"route add {A}"]


DEBIAN_ROUTE = "/sbin/route add -host $TARGET$ reject"  # net-tools: "Unknown host" for IPv6
V6 = ip_address("fd00:18::2")


def _failing_route(ran: list[str]):
    def run(command: str, timeout: float) -> CommandResult:
        ran.append(command)
        if command.startswith("/sbin/route add") and ":" in command:  # as net-tools does
            return CommandResult(command, 6, False, f"{V6}: Unknown host", 0.0)
        return CommandResult(command, 0, False, "", 0.0)
    return run


def test_a_kill_route_that_failed_is_not_recorded_as_holding_the_ban(tmp_path):
    # Debian's shipped KILL_ROUTE cannot take an IPv6 address, and -tcp listens on IPv6 too: the
    # ban stands by the native set, but `list` said "held by KILL_ROUTE", the unblock told the admin
    # to undo by hand what KILL_ROUTE had done, and KILL_ROUTE_UNDO ran for a route never made.
    bans, _kernel, lines, commands = manager(tmp_path, undo="/sbin/route del -host $TARGET$ reject",
                                             route=DEBIAN_ROUTE)
    ran: list[str] = []
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=_failing_route(ran),
                                 clock=lambda: 10.0)
    block = Block(Probe(source=V6, port=1, mode=Mode.TCP, kind=KIND_SYN),
                  (Step(StepKind.NATIVE, ""), Step(StepKind.ROUTE, DEBIAN_ROUTE)))
    assert bans.enforce(block, responder, now=10.0)
    assert ran == [f"/sbin/route add -host {V6} reject"]
    held = bans.store.get(V6)
    assert held is not None and not held.routed and held.backends == ("fake",)
    assert bans.lift(V6, 20.0, "unblocked by admin")
    assert commands == []


def test_a_kill_route_that_failed_again_keeps_the_mark_of_the_ban_it_extends(tmp_path):
    # "File exists": the route of the first block is still there, and its undo must still run.
    bans, _kernel, lines, commands = manager(tmp_path, undo=UNDO, route=ROUTE)
    ran: list[str] = []
    responder = _responder(bans, lines, ran)
    block = Block(Probe(source=A, port=1, mode=Mode.TCP, kind=KIND_SYN),
                  (Step(StepKind.NATIVE, ""), Step(StepKind.ROUTE, ROUTE)))
    assert bans.enforce(block, responder, now=10.0)
    failing = ClassicResponder(bans.hosts_deny, lines.append, 1.0,
                               runner=lambda c, t: CommandResult(c, 2, False, "File exists", 0.0),
                               clock=lambda: 11.0)
    assert bans.enforce(block, failing, now=11.0)
    held = bans.store.get(A)
    assert held is not None and held.routed
    assert bans.lift(A, 20.0, "unblocked by admin")
    assert commands == [f"route del {A}"]


def test_block_file_leaves_no_mark_where_kill_route_failed(tmp_path):
    bans, _kernel, _lines, _commands = manager(tmp_path)
    ran: list[str] = []
    block_many(bans, ManualSteps(route=DEBIAN_ROUTE, undo=UNDO), [A, V6], 1.0, None, _failing_route(ran))
    got = {address: bans.store.get(address) for address in (A, V6)}
    assert {a: (b.routed if b else None) for a, b in got.items()} == {A: True, V6: False}


def test_block_file_again_gives_no_mark_to_a_ban_kill_route_never_held(tmp_path):
    # The second `block --file` extends the ban: its KILL_ROUTE fails again ("File exists" of a
    # route 1.2 made, or net-tools and IPv6), and the mark it was recorded with stayed, so the
    # lift ran KILL_ROUTE_UNDO for a route that was never ours. A ban whose route held keeps it.
    bans, _kernel, _lines, _commands = manager(tmp_path)
    for at in (1.0, 2.0):
        block_many(bans, ManualSteps(route=DEBIAN_ROUTE, undo=UNDO), [A, V6], at, None, _failing_route([]))
    got = {address: bans.store.get(address) for address in (A, V6)}
    assert {a: (b.routed, b.count) if b else None for a, b in got.items()} == {A: (True, 2), V6: (False, 2)}


def test_block_file_on_a_ban_kill_route_never_held_leaves_no_mark_where_it_fails_again(tmp_path):
    # As for `portsentry block` (BanManager.enforce): a host 1.2 blocked keeps its route, so the
    # scan's KILL_ROUTE failed ("File exists") and its ban was left unmarked; the same host in a
    # feed given to `block --file` failed again, but an extended ban kept the mark block_many had
    # just recorded, and unblock --file then ran KILL_ROUTE_UNDO on 1.2's route.
    bans, _kernel, lines, _commands = manager(tmp_path, base=60, undo=UNDO, route=ROUTE)
    ran: list[str] = []
    exists = _route_exists(ran)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=exists, clock=lambda: 10.0)
    scan = Block(Probe(source=A, port=111, mode=Mode.ATCP, kind=KIND_SYN),
                 (Step(StepKind.HOSTS_DENY, "ALL: $TARGET$"), Step(StepKind.ROUTE, ROUTE)))
    assert bans.enforce(scan, responder, now=10.0)
    # A ban ours that KILL_ROUTE did make: its mark stays when the feed's KILL_ROUTE finds it.
    assert bans.enforce(Block(Probe(source=B, port=111, mode=Mode.ATCP, kind=KIND_SYN),
                              (Step(StepKind.ROUTE, ROUTE),)), _responder(bans, lines, []), now=10.0)
    block_many(bans, ManualSteps(route=ROUTE, undo=UNDO), [A, B], 11.0, None, exists)
    held = {address: bans.store.get(address) for address in (A, B)}
    assert {a: (b.routed if b else None) for a, b in held.items()} == {A: False, B: True}
    ran.clear()
    unblock_many(bans, ManualSteps(route=ROUTE, undo=UNDO), [A, B], 12.0, exists)
    assert ran == [f"route del {B}"]
