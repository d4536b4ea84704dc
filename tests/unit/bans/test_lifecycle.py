"""The ban lifecycle with an in-memory store and a recording backend: durations, lifting, restore."""

from __future__ import annotations

import contextlib
from ipaddress import ip_address
from typing import Any

from portsentry.bans.adopt import RemoteBan, adopt_bans
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.restore import rerun_routes, restore_bans
from portsentry.bans.store import MEMORY, BanStore
from portsentry.core.probe import IPAddress
from portsentry.responders.backend import BanBackend
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult

A = ip_address("198.18.0.2")


class Kernel(BanBackend):
    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[IPAddress, float | None] = {}

    def is_supported(self) -> bool:
        return True

    def setup(self) -> None:
        pass

    def add(self, address: IPAddress, timeout: float | None) -> None:
        self.held[address] = timeout

    def remove(self, address: IPAddress) -> None:
        self.held.pop(address, None)

    def members(self) -> dict[IPAddress, float | None]:
        return dict(self.held)

    def teardown(self) -> str | None:
        removed = f"{len(self.held)} bans" if self.held else None
        self.held.clear()
        return removed

    def owned(self) -> str:
        return "bans of this stand-in"


def manager(tmp_path, **policy) -> tuple[BanManager, Kernel, list[str], list[str]]:
    kernel, lines, commands = Kernel(), list[str](), list[str]()

    def run(command: str, timeout: float) -> CommandResult:
        commands.append(command)
        return CommandResult(command, 0, False, "", 0.0)

    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(**policy), lines.append, runner=run)
    return bans, kernel, lines, commands


def test_repeat_offenders_get_longer_bans_up_to_the_cap(tmp_path):
    bans, _kernel, _lines, _commands = manager(tmp_path, base=60, factor=2, cap=200)
    durations = []
    now = 0.0
    for _ in range(4):
        duration = bans.duration(A, now)
        durations.append(duration)
        bans.remember(A, reason="scan", mode="tcp", port=1, now=now, duration=duration,
                      hosts_deny_line=None, native=True)
        now += 1000  # past the ban
        bans.expire(now)
    assert durations == [60, 120, 200, 200]


def test_expiry_lifts_from_kernel_hosts_deny_and_runs_undo(tmp_path):
    bans, kernel, lines, commands = manager(tmp_path, base=10, undo="ip route del $TARGET$")
    assert bans.ban_native(A, 10)
    bans.remember(A, reason="scan", mode="stcp", port=1, now=0.0, duration=10,
                  hosts_deny_line="ALL: 198.18.0.2", native=True, route=True)
    assert bans.add_line(A, "ALL: 198.18.0.2", 0.0)
    assert bans.expire(5.0) == []
    assert bans.expire(11.0) == [A]
    assert kernel.held == {}
    assert (tmp_path / "hosts.deny").read_text() == ""
    assert commands == ["ip route del 198.18.0.2"]
    assert lines[-1] == "attackalert: Host 198.18.0.2 has been unblocked: ban expired"


def test_expiry_and_unblock_leave_an_identical_line_someone_else_wrote(tmp_path):
    # issue 9.3: the admin (or fail2ban, same format) had "ALL: 198.18.0.2" before our ban.
    bans, _kernel, _lines, _commands = manager(tmp_path, base=10)
    deny = tmp_path / "hosts.deny"
    deny.write_text("ALL: 198.18.0.2\n")
    bans.remember(A, reason="scan", mode="stcp", port=1, now=0.0, duration=10,
                  hosts_deny_line="ALL: 198.18.0.2", native=True)
    assert bans.add_line(A, "ALL: 198.18.0.2", 0.0) is False  # theirs: nothing appended
    restore_bans(bans, 1.0)  # restore does not take it over either
    assert bans.expire(11.0) == [A]
    assert deny.read_text() == "ALL: 198.18.0.2\n"
    bans.remember(A, reason="scan", mode="stcp", port=1, now=20.0, duration=10,
                  hosts_deny_line="ALL: 198.18.0.2", native=True)
    assert bans.lift(A, 21.0, "unblocked by admin")
    assert deny.read_text() == "ALL: 198.18.0.2\n"


def test_our_copy_goes_and_a_later_identical_one_stays(tmp_path):
    bans, _kernel, _lines, _commands = manager(tmp_path, base=10)
    deny = tmp_path / "hosts.deny"
    bans.remember(A, reason="scan", mode="stcp", port=1, now=0.0, duration=10,
                  hosts_deny_line="ALL: 198.18.0.2", native=True)
    assert bans.add_line(A, "ALL: 198.18.0.2", 0.0) is True
    with deny.open("a") as admin:
        admin.write("ALL: 198.18.0.2\n")
    assert bans.expire(11.0) == [A]
    assert deny.read_text() == "ALL: 198.18.0.2\n"
    assert bans.store.stale_lines(11.0) == set()


def test_restore_reapplies_active_bans_with_remaining_time(tmp_path):
    bans, kernel, _lines, _commands = manager(tmp_path, base=100)
    bans.remember(A, reason="scan", mode="tcp", port=1, now=0.0, duration=100,
                  hosts_deny_line="ALL: 198.18.0.2", native=True)
    restored = restore_bans(bans, 40.0)
    assert restored.banned == [A.packed]
    assert kernel.held == {A: 60.0}
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.2\n"
    restore_bans(bans, 41.0)  # idempotent: nothing doubled
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.2\n"


def test_unsaved_bans_are_written_when_the_store_comes_back(tmp_path):
    bans, _kernel, lines, _commands = manager(tmp_path)
    real_path = str(tmp_path / "state" / "bans.sqlite3")
    bans.fallback_from = real_path  # as when the disk store could not be opened at start
    bans.remember(A, reason="scan", mode="tcp", port=1, now=0.0, duration=None, hosts_deny_line=None,
                  native=True)
    bans.catch_up()
    assert "is usable again" in lines[-1]
    assert [ban.address for ban in BanStore(real_path).active(1.0)] == [A]


def test_bans_kept_in_memory_keep_their_expiry_when_the_store_comes_back(tmp_path):
    # The in-memory bans were saved with their first sighting as the time of the ban but the
    # time left from now as its length: a ban of an hour made half an hour before the disk
    # came back was saved as ending right then, and lifted at the next round.
    import time

    bans, _kernel, _lines, _commands = manager(tmp_path)
    real_path = str(tmp_path / "state" / "bans.sqlite3")
    bans.fallback_from = real_path
    made = time.time() - 1800
    bans.remember(A, reason="scan", mode="tcp", port=1, now=made, duration=3600, hosts_deny_line=None,
                  native=True)
    bans.catch_up()
    saved = BanStore(real_path).get(A)
    assert saved is not None and saved.expires == made + 3600 and saved.first_seen == made
    assert bans.expire(time.time()) == []


def test_a_hosts_deny_line_written_while_the_store_was_away_goes_at_the_bans_end(tmp_path):
    # Only the stand-in's bans were carried over to the store when it came back, not which
    # hosts.deny lines were ours: at the ban's end its line stayed, denying the host for ever
    # (and `hosts-deny tidy`, which removes only our lines, left it too).
    import time

    bans, _kernel, _lines, _commands = manager(tmp_path, base=10)
    bans.fallback_from = str(tmp_path / "state" / "bans.sqlite3")
    now = time.time()
    bans.remember(A, reason="scan", mode="tcp", port=1, now=now, duration=10,
                  hosts_deny_line="ALL: 198.18.0.2", native=True)
    assert bans.add_line(A, "ALL: 198.18.0.2", now)
    bans.catch_up()
    assert bans.expire(now + 11) == [A]
    assert (tmp_path / "hosts.deny").read_text() == ""


def test_an_unblock_also_drops_a_ban_still_waiting_to_be_saved(tmp_path, monkeypatch):
    # A ban made while the store could not be written waits in memory. Unblocking it said "not
    # blocked" and took it out of the kernel; then the store came back, the record was saved, and
    # the store (and so the engine) held a ban the kernel did not: the host went unwatched.
    from portsentry.bans.store import StoreError

    bans, kernel, _lines, _commands = manager(tmp_path, base=600)
    save = bans.store.ban

    def disk_full(*args: object, **kwargs: object) -> None:
        raise StoreError("bans.sqlite3: database or disk is full")

    monkeypatch.setattr(bans.store, "ban", disk_full)
    assert bans.remember(A, reason="scan", mode="tcp", port=1, now=0.0, duration=600,
                         hosts_deny_line="ALL: 198.18.0.2", native=True) is None
    assert bans.ban_native(A, 600)
    assert bans.add_line(A, "ALL: 198.18.0.2", 0.0)
    assert bans.lift(A, 1.0, "unblocked by admin")
    assert kernel.held == {}
    assert (tmp_path / "hosts.deny").read_text() == ""
    monkeypatch.setattr(bans.store, "ban", save)
    bans.catch_up()
    assert bans.store.get(A) is None


def test_an_unblock_while_the_store_catches_up_neither_saves_its_ban_nor_loses_another(tmp_path,
                                                                                      monkeypatch):
    # The unblock of a ban waiting to be saved dropped it from the waiting list from an admin
    # thread while the maintenance thread was saving it: the save then put it in the store after
    # the lift (a ban the kernel no longer held), and the maintenance thread's pop(0) threw away
    # the next waiting ban instead, never saved.
    import threading

    from portsentry.bans.store import StoreError

    bans, kernel, _lines, _commands = manager(tmp_path, base=600)
    B = ip_address("198.18.0.3")
    save = bans.store.ban

    def disk_full(*args: object, **kwargs: object) -> None:
        raise StoreError("bans.sqlite3: database or disk is full")

    monkeypatch.setattr(bans.store, "ban", disk_full)
    for address in (A, B):
        bans.remember(address, reason="scan", mode="tcp", port=1, now=0.0, duration=600,
                      hosts_deny_line=None, native=True)
        assert bans.ban_native(address, 600)
    saving, go_on = threading.Event(), threading.Event()

    def slow_save(*args: Any, **kwargs: Any) -> object:
        saving.set()
        go_on.wait(5)
        return save(*args, **kwargs)

    monkeypatch.setattr(bans.store, "ban", slow_save)
    catching_up = threading.Thread(target=bans.catch_up)
    catching_up.start()
    assert saving.wait(5)  # A's record is being written
    lifted: list[bool] = []
    unblocking = threading.Thread(target=lambda: lifted.append(bans.lift(A, 1.0, "unblocked by admin")))
    unblocking.start()
    unblocking.join(0.5)
    go_on.set()
    catching_up.join(5)
    unblocking.join(5)
    assert lifted == [True]
    assert bans.store.get(A) is None and A not in kernel.held
    held = bans.store.get(B)
    assert held is not None and held.active(1.0) and B in kernel.held


# --- is a recorded ban in force after a restart? (issue 9.2) ---------------------------------


def _banned(tmp_path, route: str = "ip route add blackhole $TARGET$") -> tuple[BanManager, list[str]]:
    bans, _kernel, _lines, commands = manager(tmp_path, route=route)
    bans.remember(A, reason="scan", mode="tcp", port=1, now=1.0, duration=None, hosts_deny_line=None,
                  native=False, route=True)
    return bans, commands


def restart(bans: BanManager, now: float, path: str) -> None:
    rerun_routes(bans, restore_bans(bans, now, path))


def test_kill_route_is_rerun_in_a_new_kernel_and_not_in_the_same_one(tmp_path):
    bans, commands = _banned(tmp_path)
    path = str(tmp_path / "kernel-id")
    restart(bans, 2.0, path)  # no id remembered yet: the bans may come from another kernel
    assert commands == ["ip route add blackhole 198.18.0.2"]
    restart(bans, 3.0, path)  # same boot, same namespace
    assert len(commands) == 1
    (tmp_path / "kernel-id").write_text("another boot netns-cookie:1\n")
    restart(bans, 4.0, path)
    assert len(commands) == 2


def test_a_first_start_without_bans_remembers_the_kernel_so_a_restart_reruns_nothing(tmp_path):
    # Seen with Debian's KILL_ROUTE: the first start had no bans, so no identity was written;
    # a scan, then a plain restart in the same namespace re-ran every KILL_ROUTE ("SIOCADDRT:
    # File exists" from route, a duplicate rule from iptables -I).
    bans, _kernel, _lines, commands = manager(tmp_path, route="ip route add blackhole $TARGET$")
    path = str(tmp_path / "kernel-id")
    restart(bans, 1.0, path)  # first start ever: nothing stored
    bans.remember(A, reason="scan", mode="tcp", port=1, now=2.0, duration=None, hosts_deny_line=None,
                  native=False, route=True)
    restart(bans, 3.0, path)  # same boot, same namespace
    assert commands == []


def test_a_new_kernel_reruns_kill_route_for_this_hosts_bans_only_not_a_fleet_peers(tmp_path):
    """A fleet ban never ran KILL_ROUTE here (bans.adopt); a reboot must not run it either."""
    bans, commands = _banned(tmp_path)
    adopt_bans(bans, [RemoteBan(ip_address("198.19.0.9"), None, "h2", "fleet: scan")], 1.5)
    restart(bans, 2.0, str(tmp_path / "kernel-id"))
    assert commands == ["ip route add blackhole 198.18.0.2"]


def test_an_unknown_kernel_identity_errs_on_re_applying(tmp_path, monkeypatch):
    bans, commands = _banned(tmp_path)
    path = str(tmp_path / "kernel-id")
    monkeypatch.setattr("portsentry.bans.restore.kernel_id", lambda: None)
    restart(bans, 2.0, path)
    restart(bans, 3.0, path)
    assert len(commands) == 2


def test_the_identity_is_remembered_only_after_the_re_runs(tmp_path):
    bans, _commands = _banned(tmp_path)
    path = tmp_path / "kernel-id"

    def crash(command: str, timeout: float) -> CommandResult:
        raise KeyboardInterrupt  # killed half-way through the re-runs

    bans.run = crash
    with contextlib.suppress(KeyboardInterrupt):
        restart(bans, 2.0, str(path))
    assert not path.exists()


def test_the_namespace_cookie_tells_a_recreated_namespace_apart():
    # Inodes of /proc/self/ns/net are reused by the kernel; cookies are not.
    import os
    import subprocess
    import sys

    import pytest

    from portsentry.bans.restore import kernel_id

    if os.geteuid() != 0:
        pytest.skip("needs root for unshare --net")
    here = kernel_id()
    assert here is not None and "netns-cookie:" in here
    code = "from portsentry.bans.restore import kernel_id; print(kernel_id())"
    ids = {subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip() for _ in range(3)}
    assert len(ids) == 3 and here not in ids


def test_maintenance_follows_the_feed_and_counts_what_is_in_force(tmp_path):
    # issue 10.1: the tick reads what changed, not every active ban.
    from portsentry.service.maintenance import Maintenance

    bans, _kernel, _lines, _commands = manager(tmp_path, base=10)
    found: list[object] = []
    maintenance = Maintenance(bans, frozenset, found.append, print, clock=lambda: 100.0)
    maintenance.cursor, maintenance.active = bans.store.last_change(), 0
    B = ip_address("198.18.0.3")
    bans.remember(A, reason="scan", mode="stcp", port=1, now=95.0, duration=10, hosts_deny_line=None,
                  native=True)
    bans.remember(B, reason="scan", mode="stcp", port=1, now=80.0, duration=10, hosts_deny_line=None,
                  native=True)  # over by 100.0: lifted in this round
    findings = maintenance.run_once()
    assert findings.changes == [(A, True), (B, True), (B, False)]
    assert findings.active == 1 and findings.resync is None
    assert maintenance.run_once().changes == []


def test_a_clock_set_back_does_not_hold_off_the_table_repair_or_the_pruning(tmp_path, monkeypatch):
    # The next repair and prune were due at wall-clock times: after the clock was set back by a
    # day (an NTP step, a host that booted with its clock ahead), a flushed ruleset was not
    # rebuilt and history was not pruned for that day.
    from portsentry.service.maintenance import Maintenance

    bans, _kernel, _lines, _commands = manager(tmp_path, base=10)
    repaired: list[float] = []
    pruned: list[float] = []
    monkeypatch.setattr(bans, "repair", repaired.append)
    def prune(now: float) -> int:
        pruned.append(now)
        return 0

    monkeypatch.setattr(bans, "prune", prune)
    clock = [100_000.0]
    maintenance = Maintenance(bans, frozenset, list[object]().append, print, repair_every=60.0,
                              prune_every=3600.0, clock=lambda: clock[0])
    for now in (100_030.0, 100_061.0, 103_601.0, 13_601.0, 13_602.0, 13_662.0):
        clock[0] = now
        maintenance.run_once()
    assert repaired == [100_061.0, 103_601.0, 13_601.0, 13_662.0]
    assert pruned == [100_061.0, 13_601.0]  # a minute after the start, then after the step back


def test_history_is_pruned_within_a_minute_of_a_start(tmp_path, monkeypatch):
    # The first prune was an hour after the start: a daemon restarted more often than that (a
    # crash loop under Restart=, a host rebooted through the day, a test box) never pruned, and
    # the history, hits and offenders grew past HISTORY_RETENTION and HISTORY_MAX_ROWS for good.
    from portsentry.service.maintenance import Maintenance

    bans, _kernel, _lines, _commands = manager(tmp_path, base=10)
    pruned: list[float] = []

    def prune(now: float) -> int:
        pruned.append(now)
        return 0

    monkeypatch.setattr(bans, "prune", prune)
    clock = [100_000.0]
    maintenance = Maintenance(bans, frozenset, list[object]().append, print, clock=lambda: clock[0])
    for now in (100_001.0, 100_030.0, 100_061.0, 100_120.0, 103_600.0, 103_662.0):
        clock[0] = now
        maintenance.run_once()
    assert pruned == [100_061.0, 103_662.0]


def test_restore_puts_bans_in_force_without_running_commands_and_leaves_them_for_later(tmp_path):
    # issue 10.6: READY=1 once the native set is restored; KILL_ROUTE re-runs come after.
    bans, commands = _banned(tmp_path)
    B = ip_address("198.18.0.3")
    bans.remember(B, reason="scan", mode="tcp", port=1, now=1.0, duration=None,
                  hosts_deny_line="ALL: 198.18.0.3", native=True, route=True)
    restored = restore_bans(bans, 2.0, str(tmp_path / "kernel-id"))
    assert commands == [] and restored.rerun
    assert set(bans.backend.members()) == {A, B}  # type: ignore[union-attr]
    assert (tmp_path / "hosts.deny").read_text() == "ALL: 198.18.0.3\n"
    assert bans.store.owns_line(B, "ALL: 198.18.0.3")
    assert not (tmp_path / "kernel-id").exists()  # remembered only after the re-runs
    assert rerun_routes(bans, restored) == 0
    assert sorted(commands) == ["ip route add blackhole 198.18.0.2", "ip route add blackhole 198.18.0.3"]
    assert (tmp_path / "kernel-id").exists()


def test_enforce_records_the_ban_before_any_step_runs_and_drops_it_when_every_step_failed(tmp_path):
    from portsentry.core.actions import Block, Step, StepKind
    from portsentry.core.probe import KIND_SYN, Mode, Probe
    from portsentry.responders.classic import ClassicResponder

    bans, _kernel, _lines, _commands = manager(tmp_path, base=60)
    seen_in_store: list[bool] = []

    def route(command: str, timeout: float) -> CommandResult:
        seen_in_store.append(bans.store.get(A) is not None)
        return CommandResult(command, 1 if "fail" in command else 0, False, "", 0.0)

    responder = ClassicResponder(bans.hosts_deny, _lines.append, 1.0, runner=route, clock=lambda: 100.0)
    probe = Probe(source=A, port=22, mode=Mode.STCP, kind=KIND_SYN)
    assert bans.enforce(Block(probe, (Step(StepKind.ROUTE, "route ok $TARGET$"),)), responder, now=100.0)
    ban = bans.store.get(A)
    assert seen_in_store == [True] and ban is not None and ban.expires == 160.0

    B = ip_address("198.18.0.3")
    failing = Probe(source=B, port=22, mode=Mode.STCP, kind=KIND_SYN)
    assert not bans.enforce(Block(failing, (Step(StepKind.ROUTE, "route fail $TARGET$"),)), responder,
                            duration=30.0, now=100.0)
    assert seen_in_store == [True, True] and bans.store.get(B) is None
    assert [change.detail for change in bans.store.changes(0) if change.address == B][-1] == "block failed"


def test_a_scan_s_ban_the_kernel_s_rate_cap_refuses_is_neither_recorded_nor_carried_out(tmp_path):
    """The daemon's own bans take the kernel's BAN_RATE_LIMIT slots (claim_ban_slot): a scan's
    ban refused there leaves no record and runs no step; a ban by hand is not counted."""
    from portsentry.bans.records import MANUAL_REASON
    from portsentry.core.actions import Block, Step, StepKind
    from portsentry.core.probe import KIND_CONNECT, Mode, Probe
    from portsentry.responders.classic import ClassicResponder

    bans, kernel, lines, commands = manager(tmp_path, base=60)
    claims: list[IPAddress] = []

    def full(address: IPAddress) -> bool:
        claims.append(address)
        return False

    kernel.claim_ban_slot = full  # type: ignore[method-assign]
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=bans.run, clock=lambda: 100.0)
    steps = (Step(StepKind.NATIVE, ""), Step(StepKind.ROUTE, "route $TARGET$"))
    scan = Probe(source=A, port=79, mode=Mode.TCP, kind=KIND_CONNECT)
    assert bans.enforce(Block(scan, steps), responder, now=100.0, counted=True) is None  # refused
    assert claims == [A] and bans.store.get(A) is None and kernel.held == {} and commands == []
    assert any("198.18.0.2 is not blocked: ban rate limit reached" in line for line in lines)
    # Not counted (by hand, a fleet peer's): no claim.
    assert bans.enforce(Block(Probe(source=A, port=0, mode=Mode.TCP, kind=MANUAL_REASON), steps), responder,
                        now=100.0)
    assert claims == [A] and A in kernel.held and commands == ["route 198.18.0.2"]


def test_an_expiry_leaves_the_ban_made_again_after_it_looked(tmp_path, monkeypatch):
    # expire() read the expired bans, then lifted each by address: a ban made again in between
    # (a scan, an admin's block, in another thread) was the one lifted, from the store and the
    # kernel, within a second of being made.
    bans, kernel, _lines, _commands = manager(tmp_path, base=10)
    bans.remember(A, reason="scan", mode="tcp", port=1, now=0.0, duration=10, hosts_deny_line=None,
                  native=True)
    assert bans.ban_native(A, 10)
    expired = bans.store.expired

    def banned_again_meanwhile(now: float):
        found = expired(now)
        bans.remember(A, reason="scan", mode="tcp", port=1, now=now, duration=10, hosts_deny_line=None,
                      native=True)
        bans.ban_native(A, 10)
        return found

    monkeypatch.setattr(bans.store, "expired", banned_again_meanwhile)
    assert bans.expire(11.0) == []
    ban = bans.store.get(A)
    assert ban is not None and ban.expires == 21.0 and ban.offences == 2
    assert kernel.held == {A: 10}


def test_an_unblock_while_the_ban_is_being_applied_lifts_all_of_it(tmp_path):
    # The unblock ran between the ban's record and its steps: it lifted the record (and said so),
    # then the steps put the host in the kernel and hosts.deny with no ban on record, for ever.
    import threading

    from portsentry.core.actions import Block, Step, StepKind
    from portsentry.core.probe import KIND_SYN, Mode, Probe
    from portsentry.responders.classic import ClassicResponder

    bans, kernel, said, _commands = manager(tmp_path, base=0)
    adding, go_on = threading.Event(), threading.Event()
    add = kernel.add

    def slow_add(address: IPAddress, timeout: float | None) -> None:
        adding.set()
        go_on.wait(5)
        add(address, timeout)

    kernel.add = slow_add  # type: ignore[method-assign]
    responder = ClassicResponder(bans.hosts_deny, said.append, 1.0, clock=lambda: 100.0)
    block = Block(Probe(source=A, port=22, mode=Mode.STCP, kind=KIND_SYN),
                  (Step(StepKind.NATIVE, ""), Step(StepKind.HOSTS_DENY, "ALL: $TARGET$")))
    banning = threading.Thread(target=bans.enforce, args=(block, responder), kwargs={"now": 100.0})
    banning.start()
    assert adding.wait(5)
    unblocked: list[bool] = []
    unblocking = threading.Thread(target=lambda: unblocked.append(bans.lift(A, 101.0, "unblocked")))
    unblocking.start()
    unblocking.join(0.5)  # before the fix it was done by now, while the ban was half applied
    go_on.set()
    banning.join(5)
    unblocking.join(5)
    assert unblocked == [True]
    assert bans.store.get(A) is None
    assert kernel.held == {}
    assert (tmp_path / "hosts.deny").read_text() == ""


def test_a_kill_route_undo_or_re_run_that_times_out_is_reported_as_such(tmp_path):
    """COMMAND_TIMEOUT: a hanging KILL_ROUTE_UNDO, or a KILL_ROUTE re-run after a reboot, was
    reported as 'exit status -15' (the signal that killed it), or 'exit status None' for a shell
    that could not start, never as having run out of time."""
    from portsentry.bans.bulk import _run_each

    bans, _kernel, lines, _commands = manager(tmp_path, undo="sleep-forever $TARGET$",
                                              route="sleep-forever $TARGET$", command_timeout=2.0)

    def hang(command: str, timeout: float) -> CommandResult:
        return CommandResult(command, -15, True, "", timeout)

    bans.run = bans._run = hang
    bans.remember(A, reason="scan", mode="tcp", port=1, now=1.0, duration=None, hosts_deny_line=None,
                  native=False, route=True)
    restart(bans, 2.0, str(tmp_path / "kernel-id"))
    assert bans.lift(A, 3.0, "unblocked by admin")
    assert len(_run_each(bans, ["sleep-forever $TARGET$"], [A], hang)) == 1
    failures = [line for line in lines if "sleep-forever" in line and "ERROR" in line]
    assert len(failures) == 3, lines
    for line in failures:
        assert '"sleep-forever 198.18.0.2" timed out after 2.0s' in line, line

    def unstartable(command: str, timeout: float) -> CommandResult:
        return CommandResult(command, None, False, "cannot run /bin/sh: [Errno 7] E2BIG", 0.0)

    lines.clear()
    assert len(_run_each(bans, ["x $TARGET$"], [A], unstartable)) == 1
    assert lines == ['adminalert: ERROR: There was an error trying to run command (system fail) '
                     '198.18.0.2: "x 198.18.0.2" could not be started: cannot run /bin/sh: [Errno 7] E2BIG']


def test_a_ban_lifted_while_kill_route_is_re_run_gets_no_route_after_its_lift(tmp_path):
    """The re-runs take a while after READY (many bans, a few at a time). A ban unblocked or expired
    meanwhile had its KILL_ROUTE_UNDO run, and then its KILL_ROUTE re-run: a route no record held,
    which nothing would ever undo."""
    import threading

    bans, commands = _banned(tmp_path)
    B = ip_address("198.18.0.3")
    bans.remember(B, reason="scan", mode="tcp", port=1, now=1.0, duration=None, hosts_deny_line=None,
                  native=False, route=True)
    bans.policy = BanPolicy(route="route add $TARGET$", undo="route del $TARGET$")
    restored = restore_bans(bans, 2.0, str(tmp_path / "kernel-id"))
    run = bans.run

    def lift_b_during_the_first(command: str, timeout: float) -> CommandResult:
        if len(commands) == 0:  # while the first re-run runs, an admin unblocks the other ban
            unblock = threading.Thread(target=bans.lift, args=(B, 3.0, "unblocked by admin"))
            unblock.start()
            unblock.join(5.0)
        return run(command, timeout)

    bans.run = lift_b_during_the_first
    assert rerun_routes(bans, restored, concurrency=1) == 0
    assert bans.store.get(B) is None
    assert "route add 198.18.0.3" not in commands[commands.index("route del 198.18.0.3"):], commands


def test_a_block_that_only_runs_kill_run_cmd_records_no_ban(tmp_path):
    # BLOCK_UDP="2": 1.2 runs KILL_RUN_CMD and blocks nothing. Recorded as a ban, the host was
    # put in the native set and given KILL_ROUTE at the next start, listed as banned, published
    # to fleet peers (which banned it) and undone with KILL_ROUTE_UNDO when it expired.
    from portsentry.core.actions import Block, Step, StepKind
    from portsentry.core.probe import KIND_UDP, Mode, Probe
    from portsentry.responders.classic import ClassicResponder

    bans, kernel, lines, _commands = manager(tmp_path, base=60, undo="route del $TARGET$")
    ran: list[str] = []

    def page(command: str, timeout: float) -> CommandResult:
        ran.append(command)
        return CommandResult(command, 0, False, "", 0.0)

    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, runner=page, clock=lambda: 100.0)
    probe = Probe(source=A, port=31337, mode=Mode.SUDP, kind=KIND_UDP)
    assert bans.enforce(Block(probe, (Step(StepKind.RUN_CMD, "page $TARGET$"),)), responder, now=100.0)
    assert ran == [f"page {A}"]
    assert bans.store.get(A) is None and bans.store.changes(0) == [] and A not in kernel.held
    assert bans.expire(10_000.0) == [] and _commands == []


def test_a_line_disowned_while_held_lines_are_saved_does_not_cost_another_its_record(tmp_path):
    # Held hosts.deny lines (the store could not take them) were saved by index: a lift that
    # disowned one meanwhile (another thread) replaced the list, and pop(0) then dropped the
    # next held line unsaved, so a later unblock left its hosts.deny line behind as not ours.
    bans, _kernel, _lines, _commands = manager(tmp_path)
    B = ip_address("198.18.0.3")
    bans._unsaved_lines = [(A, f"ALL: {A}", 1.0), (B, f"ALL: {B}", 1.0)]
    saving = bans.store.own_line

    def own_line(address, line, now):
        saving(address, line, now)
        if address == A:
            bans._disown_line(A, f"ALL: {A}")  # an unblock of A, on another thread, right now

    bans.store.own_line = own_line  # type: ignore[method-assign]
    bans.catch_up()
    bans.catch_up()
    assert bans.store.owns_line(B, f"ALL: {B}")
    assert not bans.store.owns_line(A, f"ALL: {A}") and bans._unsaved_lines == []
