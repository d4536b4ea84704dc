"""The ban lifecycle under concurrent bans, lifts, expiries and fleet adoptions of one address:
whatever the interleaving, the store, the kernel and hosts.deny must end up agreeing.

Most tests force one interleaving with events, as the responder, admin, maintenance and
fleet-read threads of the daemon can meet; the last hammers a few addresses from five threads.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from ipaddress import ip_address

from portsentry.bans.adopt import RemoteBan, adopt_bans
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import KIND_SYN, IPAddress, Mode, Probe
from portsentry.responders.backend import BanBackend
from portsentry.responders.classic import ClassicResponder
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult

A = ip_address("198.18.7.1")
DENY = "ALL: $TARGET$"


class Kernel(BanBackend):
    """A ban set that keeps, per address, the absolute time its element times out (None: never),
    as the kernel does from the relative timeout it is given."""

    name = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[IPAddress, float | None] = {}
        self._lock = threading.Lock()

    def is_supported(self) -> bool:
        return True

    def setup(self) -> None:
        pass

    def add(self, address: IPAddress, timeout: float | None) -> None:
        with self._lock:
            self.held[address] = None if timeout is None else time.time() + timeout

    def remove(self, address: IPAddress) -> None:
        with self._lock:
            self.held.pop(address, None)

    def members(self) -> dict[IPAddress, float | None]:
        with self._lock:
            return dict(self.held)

    def teardown(self) -> str | None:
        removed = f"{len(self.held)} bans" if self.held else None
        self.held.clear()
        return removed

    def owned(self) -> str:
        return "bans of this stand-in"


def _manager(tmp_path, base: int = 60) -> tuple[BanManager, Kernel]:
    kernel = Kernel()

    def run(command: str, timeout: float) -> CommandResult:
        return CommandResult(command, 0, False, "", 0.0)

    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=base), lambda _line: None, runner=run)
    return bans, kernel


def _scan_block(address: IPAddress) -> Block:
    return Block(Probe(source=address, port=22, mode=Mode.STCP, kind=KIND_SYN),
                 (Step(StepKind.NATIVE, ""), Step(StepKind.HOSTS_DENY, DENY)))


def _responder(bans: BanManager) -> ClassicResponder:
    return ClassicResponder(bans.hosts_deny, lambda _line: None, 1.0)


def test_a_scan_of_a_host_the_fleet_banned_for_longer_keeps_the_kernel_ban_as_long(tmp_path):
    # A peer banned the scanner for good; this host's own detection of it, within the second
    # before the engine heard of that ban, extended the record (the longer ban holds: still for
    # good) but put the address in the kernel for BLOCK_TIME. After that the kernel let the host
    # in while the store, `list` and the engine ("already blocked") said it was banned.
    bans, kernel = _manager(tmp_path, base=60)
    now = time.time()
    adopt_bans(bans, [RemoteBan(A, None, "peer", "fleet: scan")], now)
    assert bans.enforce(_scan_block(A), _responder(bans), now=now)
    held = bans.store.get(A)
    assert held is not None and held.expires is None
    assert kernel.held[A] is None


def test_a_scan_banned_while_a_fleet_batch_is_applied_keeps_the_batchs_longer_kernel_ban(tmp_path):
    # The fleet batch puts its bans in the kernel, then records them. A scan's ban of the same
    # address in between (a responder thread) recorded its own, shorter ban, and its kernel add
    # came after the batch's: the batch then extended the record (the longer ban holds), and
    # the kernel dropped the host at BLOCK_TIME while the record said for good.
    bans, kernel = _manager(tmp_path, base=60)
    in_kernel, go_on = threading.Event(), threading.Event()
    add_many = kernel.add_many

    def add_many_then_wait(wanted):
        add_many(wanted)
        in_kernel.set()
        go_on.wait(5)

    kernel.add_many = add_many_then_wait  # type: ignore[method-assign]
    now = time.time()
    fleet = threading.Thread(target=adopt_bans,
                             args=(bans, [RemoteBan(A, None, "peer", "fleet: scan")], now))
    fleet.start()
    assert in_kernel.wait(5)
    scan = threading.Thread(target=bans.enforce, args=(_scan_block(A), _responder(bans)),
                            kwargs={"now": now})
    scan.start()
    scan.join(0.5)  # before the fix its kernel add was done by now, between the batch's two halves
    go_on.set()
    fleet.join(5)
    scan.join(5)
    held = bans.store.get(A)
    assert held is not None and held.expires is None
    assert kernel.held[A] is None


def test_a_hanging_kill_route_undo_holds_up_neither_fleet_bans_nor_other_lifts(tmp_path):
    # An unblock ran KILL_ROUTE_UNDO holding the manager's lock, up to COMMAND_TIMEOUT: meanwhile
    # the fleet reader could apply no peer's ban and the maintenance thread stopped at its next
    # expiry (and with it the settling of kernel bans and the change feed), for every address.
    kernel = Kernel()
    undoing, go_on = threading.Event(), threading.Event()

    def run(command: str, timeout: float) -> CommandResult:
        if "198.18.7.1" in command:
            undoing.set()
            go_on.wait(5)
        return CommandResult(command, 0, False, "", 0.0)

    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=60, undo="ip route del $TARGET$"), lambda _line: None, runner=run)
    other, third = ip_address("198.18.7.2"), ip_address("198.18.7.3")
    now = time.time()
    for address in (A, third):
        bans.remember(address, reason="scan", mode="stcp", port=22, now=now - 100, duration=60,
                      hosts_deny_line=None, native=True, route=True)
    unblock = threading.Thread(target=bans.lift, args=(A, now, "unblocked by admin"))
    unblock.start()
    try:
        assert undoing.wait(5)
        fleet = threading.Thread(target=adopt_bans,
                                 args=(bans, [RemoteBan(other, None, "peer", "fleet")], now))
        fleet.start()
        fleet.join(2)
        expiry: list[list[IPAddress]] = []
        maintenance = threading.Thread(target=lambda: expiry.append(bans.expire(now)))
        maintenance.start()
        maintenance.join(2)
        assert not fleet.is_alive() and other in kernel.held
        assert not maintenance.is_alive() and expiry == [[third]]
    finally:
        go_on.set()
        unblock.join(5)
    assert bans.store.get(A) is None and A not in kernel.held


def test_bans_lifts_expiries_and_fleet_bans_of_a_few_hosts_from_many_threads_end_up_agreeing(tmp_path):
    # The daemon's threads at once on three addresses: scans (responders), unblocks (admin),
    # expiries and kernel bans recorded late (maintenance), peers' bans and lifts (fleet-read).
    # Whatever the interleaving, every record is in the kernel until the same time, nothing is
    # in the kernel without a record, and hosts.deny holds exactly the recorded bans' lines.
    from portsentry.bans.adopt import lift_remote

    bans, kernel = _manager(tmp_path, base=30)
    responder = _responder(bans)
    addresses = [ip_address(f"198.18.7.{n}") for n in (1, 2, 3)]
    start = threading.Barrier(5)
    failures: list[BaseException] = []

    def hammer(seed: int) -> None:
        pick = random.Random(seed)
        start.wait()
        try:
            for _ in range(150):
                address, now = pick.choice(addresses), time.time()
                match pick.randrange(6):
                    case 0:
                        bans.enforce(_scan_block(address), responder, now=now)
                    case 1:
                        bans.lift(address, now, "unblocked by admin")
                    case 2:
                        expires = pick.choice([None, now + 10, now + 100])
                        adopt_bans(bans, [RemoteBan(address, expires, "peer", "fleet: scan")], now, DENY)
                    case 3:
                        lift_remote(bans, address, "peer", now)
                    case 4:
                        bans.expire(now + 50)  # everything banned for less than 50 s more
                    case _:
                        bans.record_kernel_ban(address, "stcp", 22, now)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    recorded = {ban.address: ban for ban in bans.store.active(time.time())}
    in_kernel = kernel.members()
    assert set(recorded) == set(in_kernel)
    for address, ban in recorded.items():
        until = in_kernel[address]
        assert (ban.expires is None) == (until is None), address
        assert ban.expires is None or until is None or abs(ban.expires - until) < 1.0, address
    lines = (tmp_path / "hosts.deny").read_text().splitlines() if (tmp_path / "hosts.deny").exists() else []
    assert sorted(lines) == sorted(ban.hosts_deny_line for ban in recorded.values() if ban.hosts_deny_line)


def test_an_unblock_while_a_flushed_table_is_rebuilt_is_not_undone_by_the_rebuild(tmp_path):
    # Once a minute the maintenance thread rebuilds our table if someone flushed the ruleset
    # (`systemctl restart nftables`) and puts every active ban back. An unblock between its read
    # of the active bans and its kernel add (an admin's, a fleet peer's) was undone: the host
    # went back in the kernel, for good for a ban that had no end, with no record left to lift.
    bans, kernel = _manager(tmp_path, base=0)
    now = time.time()
    bans.remember(A, reason="scan", mode="stcp", port=22, now=now, duration=None, hosts_deny_line=None,
                  native=True)
    bans.ban_native(A, None)
    kernel.repair_capture = lambda: True  # type: ignore[method-assign]
    kernel.held.clear()  # the flush
    add_many = kernel.add_many
    unblocked: list[bool] = []
    admin = threading.Thread(target=lambda: unblocked.append(bans.lift(A, now, "unblocked by admin")))

    def unblock_then_add(wanted):
        wanted = list(wanted)
        admin.start()
        admin.join(0.5)  # before the fix it was done by now, between the read and the add
        add_many(wanted)

    kernel.add_many = unblock_then_add  # type: ignore[method-assign]
    bans.repair(now)
    admin.join(5)
    assert unblocked == [True] and bans.store.get(A) is None
    assert A not in kernel.held


def test_an_unblock_while_the_bans_are_restored_at_start_is_not_undone_by_the_restore(tmp_path):
    # The control socket answers from the start of `open`, before the stored bans are put back
    # (seconds for a million): an unblock between the restore's read of the active bans and its
    # kernel add was undone, the host back in the kernel (for good, for a ban with no end) and
    # its hosts.deny line back, with no record left to lift them.
    from portsentry.bans.restore import restore_bans

    bans, kernel = _manager(tmp_path, base=0)
    now = time.time()
    bans.remember(A, reason="scan", mode="stcp", port=22, now=now, duration=None,
                  hosts_deny_line="ALL: 198.18.7.1", native=True)
    restore_many = kernel.restore_many
    unblocked: list[bool] = []
    admin = threading.Thread(target=lambda: unblocked.append(bans.lift(A, now, "unblocked by admin")))

    def unblock_then_restore(wanted):
        wanted = list(wanted)
        admin.start()
        admin.join(0.5)  # before the fix it was done by now, between the read and the add
        restore_many(wanted)

    kernel.restore_many = unblock_then_restore  # type: ignore[method-assign]
    restore_bans(bans, now)
    admin.join(5)
    assert unblocked == [True] and bans.store.get(A) is None
    assert A not in kernel.held
    assert (tmp_path / "hosts.deny").read_text() == ""


def test_a_fleet_stop_between_the_two_looks_at_on_change_does_not_fail_the_ban(tmp_path):
    # changed() looked at on_change, then read it again to call it: the fleet's stop (main
    # thread, at shutdown) clearing it in between made a responder's ban raise TypeError after
    # its record was made and before any step ran: a ban on record, nothing in the kernel.
    woken: list[str] = []

    class StoppedMeanwhile(BanManager):
        _hook: Callable[[], None] | None = None

        @property
        def on_change(self):
            hook, self._hook = self._hook, None  # the fleet stops right after this look
            return hook

        @on_change.setter
        def on_change(self, value):
            self._hook = value

    kernel = Kernel()
    bans = StoppedMeanwhile(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                            BanPolicy(base=60), lambda _line: None)
    bans.on_change = lambda: woken.append("wake")
    assert bans.enforce(_scan_block(A), _responder(bans), now=time.time())
    assert woken == ["wake"] and A in kernel.members()


class _HookedLock:
    """A lock that, the first time it is taken, first runs `hook` (from the thread taking it)."""

    def __init__(self, lock: threading.Lock, hook: Callable[[], None]) -> None:
        self._lock, self._hook = lock, hook

    def __enter__(self) -> bool:
        hook, self._hook = self._hook, lambda: None
        hook()
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _recovering(tmp_path) -> tuple[BanManager, Kernel, str]:
    """A manager on the in-memory stand-in, with A banned there, as when the disk store could
    not be opened at start; the disk store can be opened now."""
    bans, kernel = _manager(tmp_path)
    real_path = str(tmp_path / "state" / "bans.sqlite3")
    bans.fallback_from = real_path
    now = time.time()
    bans.remember(A, reason="scan", mode="stcp", port=22, now=now, duration=600, hosts_deny_line=None,
                  native=True)
    bans.ban_native(A, 600)
    return bans, kernel, real_path


def test_a_ban_written_to_the_stand_in_while_the_store_comes_back_is_not_lost(tmp_path):
    # catch_up read the stand-in's bans, then closed it: a responder that had taken the stand-in
    # before the swap and wrote its ban in between had it accepted, and lost with the stand-in.
    from portsentry.bans.store import StoreError

    bans, _kernel, real_path = _recovering(tmp_path)
    other = ip_address("198.18.7.2")
    stand_in = bans.store
    outcome: list[str] = []

    def late_write() -> None:
        try:
            stand_in.ban(other, reason="scan", mode="stcp", port=22, now=time.time(), duration=600)
        except StoreError:
            outcome.append("refused")  # remember() keeps it in memory and saves it later
        else:
            outcome.append("accepted")

    def meanwhile() -> None:
        writer = threading.Thread(target=late_write)
        writer.start()
        writer.join(0.3)

    bans._unsaved_lock = _HookedLock(bans._unsaved_lock, meanwhile)  # type: ignore[assignment]
    bans.catch_up()
    bans.catch_up()
    assert outcome
    disk = BanStore(real_path)
    assert disk.get(A) is not None
    assert outcome == ["refused"] or disk.get(other) is not None, outcome


def test_an_unblock_while_the_store_comes_back_does_not_see_the_ban_saved_after_it(tmp_path):
    # The swap to the disk store came first, the stand-in's bans were queued for saving after:
    # an unblock in between found the ban in neither (and said "not blocked" after taking it
    # out of the kernel), then the ban was saved: on record, listed, "already blocked", not
    # in the kernel.
    bans, kernel, real_path = _recovering(tmp_path)
    unblocks: list[threading.Thread] = []

    def meanwhile() -> None:
        unblock = threading.Thread(target=bans.lift, args=(A, time.time(), "unblocked by admin"))
        unblocks.append(unblock)
        unblock.start()
        unblock.join(0.3)

    bans._unsaved_lock = _HookedLock(bans._unsaved_lock, meanwhile)  # type: ignore[assignment]
    bans.catch_up()
    for unblock in unblocks:
        unblock.join(5.0)
    assert unblocks and not unblocks[0].is_alive()
    bans.catch_up()  # the next round
    ban = BanStore(real_path).get(A)
    recorded = ban is not None and ban.active(time.time())
    assert recorded == (A in kernel.members()), (ban, kernel.members())
