"""The daemon's side of the kernel's first-probe bans: which sources it spares, and how every
caught entry is settled (adopted, lifted, or recorded late)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from ipaddress import ip_address, ip_network

from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.config.settings import Config
from portsentry.core.engine import EngineSettings
from portsentry.core.probe import IPAddress, Mode, Probe, Protocol
from portsentry.responders.backend import BackendError, Caught, Guarded
from portsentry.responders.classic import ClassicResponder
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult
from portsentry.sensors.listeners import ListeningPorts
from portsentry.service.kernelbans import DroppedProbes, Guards, KernelBans, LateSteps, guards_of
from portsentry.service.wiring import eligible_ports, kernel_ban_for, watch_for
from tests.unit.bans.test_lifecycle import Kernel

SCANNER = ip_address("198.18.0.2")
GATEWAY = ip_address("198.18.0.1")


class CatchingKernel(Kernel):
    def __init__(self) -> None:
        super().__init__()
        self.entries: list[Caught] = []
        self.guards: tuple[list[Guarded], list[Guarded]] | None = None

    def first_probe_bans(self) -> bool:
        return True

    def set_guards(self, protect: Iterable[Guarded], nokernel: Iterable[Guarded]) -> None:
        self.guards = (list(protect), list(nokernel))

    def caught(self) -> list[Caught]:
        return list(self.entries)

    def release_caught(self, entries: Iterable[Caught]) -> None:
        self.entries = [e for e in self.entries if e not in set(entries)]


class Listening(ListeningPorts):
    def __init__(self, protocol: Protocol, ports: set[int]) -> None:
        super().__init__(protocol)
        self.fixed = ports

    def refresh(self, now: float) -> None:
        pass

    def confirm(self, port: int, now: float, flow: object = None) -> bool:
        return port in self.fixed


def setup(tmp_path, live: frozenset[int] = frozenset()) -> tuple[KernelBans, CatchingKernel, list[str]]:
    kernel, lines = CatchingKernel(), list[str]()
    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=60, factor=2, cap=600), lines.append)
    listeners: dict[Protocol, ListeningPorts] = {Protocol.TCP: Listening(Protocol.TCP, set(live)),
                                                 Protocol.UDP: Listening(Protocol.UDP, set())}
    kb = KernelBans(bans, lines.append, grace=3.0, listeners=listeners)
    kb.update(guards_of([ip_network("198.18.9.0/24")], [GATEWAY], [ip_network("198.19.0.0/16")]))
    return kb, kernel, lines


def test_guards_spare_gateways_the_ignore_list_impossible_and_sensitive_sources() -> None:
    guards = guards_of([ip_network("198.18.9.0/24")], [GATEWAY], [ip_network("198.19.0.0/16")])
    assert "gateway" in (guards.spared(GATEWAY) or "")
    assert "ignore list" in (guards.spared(ip_address("198.18.9.77")) or "")
    assert "ignore list" in (guards.spared(ip_address("::ffff:198.18.9.77")) or "")
    assert "loopback" in (guards.spared(ip_address("127.0.0.1")) or "")
    assert "SENSITIVE" in (guards.spared(ip_address("198.19.4.4")) or "")
    assert guards.spared(SCANNER) is None
    # Gateways are copied to the daemon (which refuses them, and says so), not hidden from it.
    assert ip_network("0.0.0.0/8") in guards.nokernel() and GATEWAY in guards.nokernel()
    assert guards.protect() == [ip_network("198.18.9.0/24")]
    with_broadcast = guards_of([], [], [], [ip_address("198.18.0.255")])
    assert "broadcast" in (with_broadcast.spared(ip_address("198.18.0.255")) or "")
    assert ip_address("198.18.0.255") in with_broadcast.nokernel()


def test_a_ban_the_daemon_recorded_is_adopted_and_its_entry_released(tmp_path) -> None:
    kb, kernel, _lines = setup(tmp_path)
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    kb.bans.remember(SCANNER, reason="TCP SYN/Normal scan", mode="stcp", port=79, now=100.0, duration=60,
                     hosts_deny_line=None, native=True)
    kb.settle(100.5)
    assert kernel.entries == [] and kb.recorded_late == 0 and kb.lifted == 0


def test_a_spared_source_or_a_live_port_has_its_kernel_ban_lifted(tmp_path) -> None:
    kb, kernel, lines = setup(tmp_path, live=frozenset({8080}))
    other = ip_address("198.18.0.3")
    kernel.held = {GATEWAY: 60.0, other: 60.0}
    kernel.entries = [(GATEWAY, Protocol.TCP, 79), (other, Protocol.TCP, 8080)]
    kb.settle(100.0)
    assert kernel.entries == [] and kernel.held == {} and kb.lifted == 2
    assert any("198.18.0.1 was lifted: it is a gateway" in line for line in lines)
    assert any("198.18.0.3 was lifted: TCP port 8080 has a live service" in line for line in lines)
    assert kb.bans.store.get(GATEWAY) is None


def test_an_unrecorded_kernel_ban_is_recorded_after_the_grace_and_said_so(tmp_path) -> None:
    kb, kernel, lines = setup(tmp_path)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.UDP, 161)]
    kb.settle(100.0)
    kb.settle(102.0)
    assert kernel.entries and kb.bans.store.get(SCANNER) is None  # still within the grace
    kb.settle(103.5)
    ban = kb.bans.store.get(SCANNER)
    assert ban is not None and ban.port == 161 and ban.mode == "sudp" and ban.expires == 103.5 + 60
    assert kernel.entries == [] and kernel.held[SCANNER] == 60.0 and kb.recorded_late == 1
    assert any("was blocked by the kernel on its first probe to UDP port 161" in line for line in lines)


def test_a_kernel_ban_recorded_late_gets_hosts_deny_kill_route_kill_run_cmd_and_its_history(tmp_path) -> None:
    """A ban the kernel made while the daemon was stopped (or with its copy still queued at the
    stop) is recorded at the next start: it gets what a ban of its probe gets, not the kernel
    set alone; the commands run on the worker `submit` hands them to."""
    kb, kernel, lines = setup(tmp_path)
    ran: list[str] = []

    def runner(command: str, _timeout: float) -> CommandResult:
        ran.append(command)
        return CommandResult(command, 0, False, "", 0.0)

    responder = ClassicResponder(kb.bans.hosts_deny, lines.append, 5.0, runner=runner)
    settings = EngineSettings(block_tcp=1, native_ban=True, kill_hosts_deny="ALL: $TARGET$",
                              kill_route="route add $TARGET$", kill_run_cmd="run $TARGET$ $PORT$ $MODE$")
    queued: list[Callable[[], None]] = []
    history: list[tuple[Probe, float]] = []
    kb._late = LateSteps(responder, lambda protocol: settings.steps(settings.block_level(protocol)),
                         queued.append, lambda probe, at: history.append((probe, at)), lambda: clock)
    clock = 104.0
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    kb.settle(100.0)
    kb.settle(103.5)
    ban = kb.bans.store.get(SCANNER)
    assert ban is not None and not ban.routed and ban.hosts_deny_line == "ALL: 198.18.0.2"
    assert ran == [] and len(queued) == 1  # not on the maintenance thread
    queued.pop()()
    assert ran == ["route add 198.18.0.2", "run 198.18.0.2 79 stcp"]
    ban = kb.bans.store.get(SCANNER)
    assert ban is not None and ban.routed  # marked as KILL_ROUTE ran
    assert kb.bans.hosts_deny.lines() == ["ALL: 198.18.0.2"]
    assert [(probe.source, probe.port, probe.mode) for probe, _at in history] == [(SCANNER, 79, Mode.STCP)]
    # Lifted before its steps ran: none runs, and no line is left behind.
    other = ip_address("198.18.0.3")
    kernel.held[other] = 60.0
    kernel.entries = [(other, Protocol.TCP, 79)]
    kb.settle(200.0)
    kb.settle(203.5)
    clock = 204.0
    assert kb.bans.lift(other, clock, "admin")
    queued.pop()()
    assert ran == ["route add 198.18.0.2", "run 198.18.0.2 79 stcp"] and len(history) == 1
    assert kb.bans.hosts_deny.lines() == ["ALL: 198.18.0.2"]


def test_guards_are_pushed_only_when_they_change(tmp_path) -> None:
    kb, kernel, _lines = setup(tmp_path)
    kb.push()
    assert kernel.guards is not None and GATEWAY in kernel.guards[1]
    kernel.guards = None
    same = guards_of([ip_network("198.18.9.0/24")], [GATEWAY], [ip_network("198.19.0.0/16")])
    assert not kb.update(same)
    assert kb.update(Guards(protected=frozenset({GATEWAY, SCANNER})))
    kb.push()
    assert kernel.guards is not None and SCANNER in kernel.guards[1]


def test_the_kernel_bans_only_where_user_space_would_block_on_the_first_hit() -> None:
    config = Config(source="t", block_tcp=1, block_udp=0, block_time=3600, ban_rate_limit=60)
    kernel = kernel_ban_for(config, {Protocol.TCP, Protocol.UDP})
    assert kernel is not None and kernel.protocols == {Protocol.TCP} and kernel.timeout == 3600
    assert kernel_ban_for(Config(source="t", block_tcp=1, scan_trigger=2), {Protocol.TCP}) is None
    assert kernel_ban_for(Config(source="t", block_tcp=1, kernel_ban="off"), {Protocol.TCP}) is None
    assert kernel_ban_for(Config(source="t", block_tcp=1, ban_rate_limit_net=3), {Protocol.TCP}) is None
    assert kernel_ban_for(Config(source="t", block_tcp=2), {Protocol.TCP}) is None
    forever = kernel_ban_for(Config(source="t", block_tcp=1, block_time=0), {Protocol.TCP})
    assert forever is not None and forever.timeout is None


def test_eligible_ports_are_watched_not_excluded_and_not_live() -> None:
    from portsentry.core.probe import Mode

    config = Config(source="t", tcp_ports=(1, 79, 111), advanced_ports_tcp=10, advanced_exclude_tcp=(3,))
    watches = [watch_for(Mode.STCP, config), watch_for(Mode.ATCP, config)]
    assert eligible_ports(watches, Protocol.TCP, frozenset({111, 5})) == {1, 2, 4, 6, 7, 8, 9, 79}
    assert eligible_ports(watches, Protocol.UDP, frozenset()) == set()


def test_a_kernel_that_refuses_the_ban_rules_keeps_nflog_capture_without_them(monkeypatch) -> None:
    """KERNEL_BAN="auto" on a kernel without nft_socket (or dynamic sets): the NFLOG capture
    stays, without the first-probe ban, and the admin is told; before, the whole NFLOG capture
    gave way to AF_PACKET."""
    from collections.abc import Collection

    from portsentry.responders.backend import BackendError
    from portsentry.responders.nft_capture import KernelBan
    from portsentry.responders.nftables import NftablesBackend
    from portsentry.service import wiring

    class Nft(NftablesBackend):
        def __init__(self) -> None:  # no netlink: only capture_rules is used here
            self.calls: list[object] = []

        def capture_rules(self, group: int, max_port: int | None, protocols: Collection[Protocol],
                          quiet_udp_ports: Collection[int] = (), kernel: KernelBan | None = None) -> None:
            self.calls.append(kernel)
            if kernel is not None:
                raise BackendError("Error: Could not process rule: No such file or directory (socket)")

    class Capture:
        def __init__(self, group: int, quieter: object = None, on_live: object = None) -> None:
            self.closed = False

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(wiring, "NflogCapture", Capture)
    nft, said = Nft(), list[str]()
    config = Config(source="t", block_tcp=1, capture="auto")
    opened = wiring.capture_factory(config, nft, said.append)(1024, {Protocol.TCP})
    assert isinstance(opened, Capture) and not opened.closed
    assert nft.calls[0] is not None and nft.calls[1:] == [None]
    assert len(said) == 1
    assert said[0].startswith("adminalert: WARNING: first-probe ban in the kernel unavailable")


# -- probes of banned sources that only the kernel saw ---------------------------------------------


class CountingKernel(CatchingKernel):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[IPAddress, int] = {}
        self.failing = False

    def dropped(self) -> dict[IPAddress, int]:
        if self.failing:
            raise BackendError("nft: no such set")
        return dict(self.counts)


def counting(tmp_path) -> tuple[DroppedProbes, CountingKernel, list[str]]:
    kernel, lines = CountingKernel(), list[str]()
    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")),
                      BanPolicy(base=60, factor=2, cap=600), lines.append)
    return DroppedProbes(bans, lines.append, every=5.0), kernel, lines


def summary(address: str, count: int) -> str:
    return (f"attackalert: Host: {address}/{address} is already blocked: {count} more probes to "
            "watched ports dropped by the kernel, not logged one by one")


def test_each_round_says_what_the_kernel_dropped_since_the_last(tmp_path) -> None:
    dropped, kernel, lines = counting(tmp_path)
    other = ip_address("fd00::2")
    kernel.counts = {SCANNER: 4}
    dropped.summarize(0.0)  # counts made before this start were reported by the run before
    assert lines == []
    kernel.counts = {SCANNER: 10, other: 3}
    dropped.summarize(2.0)  # not a round yet
    assert lines == []
    dropped.summarize(5.0)
    assert lines == [summary("198.18.0.2", 6), summary("fd00::2", 3)]
    lines.clear()
    dropped.summarize(10.0)  # nothing new: nothing said
    assert lines == []
    # The scanner's count expired and began again: what it holds now is all new.
    kernel.counts = {SCANNER: 2, other: 3}
    dropped.summarize(15.0)
    assert lines == [summary("198.18.0.2", 2)]
    assert dropped.total == 11


def test_at_shutdown_the_last_counts_are_said_and_a_failed_read_is_reported(tmp_path) -> None:
    dropped, kernel, lines = counting(tmp_path)
    dropped.summarize(0.0)
    kernel.failing = True
    dropped.summarize(5.0)
    assert lines == ["adminalert: ERROR: cannot read the kernel's counts of dropped probes: nft: no such set"]
    lines.clear()
    kernel.failing = False
    kernel.counts = {SCANNER: 7}
    dropped.summarize(6.0, force=True)  # shutdown: no waiting for the round
    assert lines == [summary("198.18.0.2", 7)]


def test_an_unblock_while_a_kernel_ban_is_recorded_late_leaves_no_ban_behind(tmp_path) -> None:
    """The late record and its kernel ban took no turn with lifts of the address: an unblock that
    came between them lifted the new record, and the ban then went into the kernel with no record
    left to ever lift it (for BLOCK_TIME="0", never)."""
    import threading

    kb, kernel, _lines = setup(tmp_path)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    kb.settle(100.0)
    ban_native = kb.bans.ban_native
    unblocks: list[threading.Thread] = []

    def unblock_meanwhile(address: IPAddress, duration: float | None, failed: list[str] | None = None,
                          retimed: bool = False) -> bool:
        unblock = threading.Thread(target=kb.bans.lift, args=(SCANNER, 103.6, "unblocked by admin"))
        unblock.start()
        unblock.join(0.3)  # it either ran now (the bug) or waits for its turn
        unblocks.append(unblock)
        return ban_native(address, duration, failed, retimed)

    kb.bans.ban_native = unblock_meanwhile  # type: ignore[method-assign]
    kb.settle(103.5)
    for unblock in unblocks:
        unblock.join(5.0)
    assert unblocks and not unblocks[0].is_alive()
    ban = kb.bans.store.get(SCANNER)
    recorded = ban is not None and ban.active(103.7)
    assert recorded == (SCANNER in kernel.held), (ban, kernel.held)


def test_an_unblock_before_the_kernel_ban_was_settled_is_not_undone_by_the_late_record(tmp_path) -> None:
    """`portsentry unblock` of a kernel ban nobody had recorded yet (the daemon was stopped, or
    within the second before its maintenance round) removed the element but left the caught
    entry, and the daemon then recorded the ban "late" and put it back: the unblock was undone."""
    kb, kernel, lines = setup(tmp_path)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    assert not kb.bans.lift(SCANNER, 100.0, "unblocked by admin")  # nothing recorded to lift
    assert kernel.held == {}
    kb.settle(100.5)
    kb.settle(104.0)
    assert kernel.held == {} and kb.bans.store.get(SCANNER) is None, lines
    assert kb.recorded_late == 0 and kernel.entries == []


def test_a_late_record_does_not_hold_up_the_maintenance_thread_while_the_address_is_busy(tmp_path) -> None:
    """The late record waited for its turn on the maintenance thread: while the address's own
    block (the late NFLOG copy's KILL_ROUTE and KILL_RUN_CMD) or an unblock's KILL_ROUTE_UNDO ran,
    expiry, repair and every summary stopped, for up to COMMAND_TIMEOUT per command. It is
    left for the next round instead."""
    import threading

    kb, kernel, _lines = setup(tmp_path)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    kb.settle(100.0)
    settling = threading.Thread(target=kb.settle, args=(103.5,))
    with kb.bans._turns.turn(SCANNER):  # a ban or lift of the scanner is running its commands
        settling.start()
        settling.join(5.0)
        busy = settling.is_alive()
    settling.join()
    assert not busy
    assert kernel.entries == [(SCANNER, Protocol.TCP, 79)] and kb.bans.store.get(SCANNER) is None
    kb.settle(104.5)  # the next round
    ban = kb.bans.store.get(SCANNER)
    assert ban is not None and ban.active(104.5) and kb.recorded_late == 1 and kernel.entries == []


def test_kernel_bans_left_when_the_first_probe_ban_is_turned_off_are_still_settled(tmp_path) -> None:
    # The kernel path off (a reload), an entry still unsettled: its ban stayed in the kernel with
    # no record, unseen by `list` and untouched by unblock, until its timeout.
    kb, kernel, lines = setup(tmp_path)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]

    class TurnedOff(CatchingKernel):
        def first_probe_bans(self) -> bool:
            return False

        def keeps_caught(self) -> bool:
            return bool(self.entries)

    kernel.__class__ = TurnedOff
    kb.settle(100.0)
    kb.settle(103.5)
    ban = kb.bans.store.get(SCANNER)
    assert ban is not None and ban.active(103.5) and kernel.entries == []
    assert any("was blocked by the kernel on its first probe" in line for line in lines)


def test_a_late_kernel_ban_lifted_before_its_kill_route_ran_gets_no_kill_route_undo(tmp_path) -> None:
    # The late record marked the ban as held by KILL_ROUTE before the command had run on its
    # worker; an unblock in between then ran KILL_ROUTE_UNDO for a route never made here, which
    # takes out a route someone else made (1.2's, an admin's). Marked when KILL_ROUTE runs now.
    from dataclasses import replace

    kb, kernel, lines = setup(tmp_path)
    ran: list[str] = []

    def runner(command: str, _timeout: float) -> CommandResult:
        ran.append(command)
        return CommandResult(command, 0, False, "", 0.0)

    kb.bans.policy = replace(kb.bans.policy, undo="route del $TARGET$", route="route add $TARGET$")
    kb.bans._run = runner
    responder = ClassicResponder(kb.bans.hosts_deny, lines.append, 5.0, runner=runner)
    settings = EngineSettings(block_tcp=1, native_ban=True, kill_route="route add $TARGET$")
    queued: list[Callable[[], None]] = []
    kb._late = LateSteps(responder, lambda protocol: settings.steps(settings.block_level(protocol)),
                         queued.append, lambda probe, at: None, lambda: 104.0)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    kb.settle(100.0)
    kb.settle(103.5)
    assert len(queued) == 1 and ran == []
    assert kb.bans.lift(SCANNER, 104.0, "unblocked by admin")
    queued.pop()()
    assert ran == []  # neither KILL_ROUTE (lifted first) nor its undo
    # Not lifted: the route is made and marked, and its lift undoes it.
    kernel.held[SCANNER] = 60.0
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    kb.settle(200.0)
    kb.settle(203.5)
    ban = kb.bans.store.get(SCANNER)
    assert ban is not None and not ban.routed  # not before KILL_ROUTE ran
    queued.pop()()
    ban = kb.bans.store.get(SCANNER)
    assert ran == ["route add 198.18.0.2"] and ban is not None and ban.routed
    assert kb.bans.lift(SCANNER, 205.0, "unblocked by admin")
    assert ran == ["route add 198.18.0.2", "route del 198.18.0.2"]
