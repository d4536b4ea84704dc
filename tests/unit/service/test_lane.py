"""The daemon's side of the fast lane (service.lane, service.lane_path): when it may be on, what is
compiled into it, the pins that keep it off sources the engine knows, and how its reports are
taken in. The C lane itself is tested in tests/unit/sensors/test_lane.py; here it is a stand-in
that records what the keeper told it."""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
from ipaddress import ip_address, ip_network
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config, engine_settings
from portsentry.core import messages
from portsentry.core.actions import Block, Decision, Log, Started, Step, StepKind
from portsentry.core.engine import Engine
from portsentry.core.probe import KIND_SYN, Mode, Probe, Protocol
from portsentry.journal.journal import Journal
from portsentry.journal.syslog import SyslogWriter
from portsentry.sensors.lane import RECORD_SLOT, Act
from portsentry.sensors.stealth import Watch
from portsentry.service import lane_replay as lanes
from portsentry.service.lane import LaneKeeper, deny_networks, port_table, why_off
from portsentry.service.lane_replay import replay

ROUTE = "/sbin/ip route add blackhole $TARGET$"
SCANNER = ip_address("198.18.0.10")
HERE = ip_address("198.18.0.1")


class FakeLane:
    """Records what the keeper pushes; renders KILL_ROUTE as C does unless told otherwise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.enabled = False
        self.pins: set[bytes] = set()
        self.acted = 0
        self.render_wrong = False
        self.route: str | None = None
        self.failures = 0

    def enable(self, on: bool) -> None:
        self.enabled = on

    def set_record(self, fd: int) -> None:
        self.calls.append(("record", fd))

    def set_route(self, template: str | None) -> None:
        self.route = template
        self.calls.append(("route", template))

    def render(self, target: str, port: int, mode: Mode) -> str | None:
        from portsentry.responders.substitute import substitute
        assert self.route is not None
        text = substitute(self.route, ip_address(target), port, mode)
        return text + " x" if self.render_wrong else text

    def set_syslog(self, *args: str) -> None:
        self.calls.append(("syslog", args))

    def set_ports(self, table: bytes) -> None:
        self.calls.append(("ports", table))

    def set_local(self, local: Any) -> None:
        self.calls.append(("local", frozenset(local)))

    def set_deny(self, networks: Any) -> None:
        self.calls.append(("deny", tuple(networks)))

    def set_ignore_file(self, path: Any, key: Any) -> None:
        self.calls.append(("ignore", (path, key)))

    def pin(self, address: Any) -> None:
        self.pins.add(address.packed)

    def unpin(self, address: Any) -> None:
        self.pins.discard(address.packed)

    def pin_many(self, packed: Any) -> None:
        self.pins |= set(packed)

    def clear_pins(self) -> None:
        self.pins.clear()

    def allow(self, adopted: int, free: int) -> int:
        self.calls.append(("allow", (adopted, free)))
        return self.acted

    def claim(self) -> bool:
        self.calls.append(("claim", None))
        return True

    def shell_done(self) -> None:
        self.calls.append(("shell_done", None))

    def errors(self) -> int:
        return self.failures

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


class FakeListeners:
    def __init__(self, ports: frozenset[int] = frozenset()) -> None:
        self._ports = ports

    def ports(self) -> frozenset[int]:
        return self._ports


def fake_sensor(lane: FakeLane | None = None, listening: frozenset[int] = frozenset(),
                watches: tuple[Watch, ...] = (Watch(Mode.ATCP, below=1024, exclude=frozenset({113})),),
                published: bool = False) -> Any:
    from portsentry.sensors.stealth import StealthSensor

    sensor = StealthSensor.__new__(StealthSensor)
    sensor.watches = watches
    sensor.listeners = {Protocol.TCP: FakeListeners(listening), Protocol.UDP: FakeListeners()}  # type: ignore[dict-item]
    broadcast = frozenset({ip_address("198.18.0.255")})
    sensor.addresses = SimpleNamespace(local=frozenset({HERE}), broadcast=broadcast)  # type: ignore[assignment]
    sensor.published = SimpleNamespace(active=published)  # type: ignore[assignment]
    sensor._capture = None
    sensor.__dict__["_fake_lane"] = lane  # StealthSensor.lane answers with it (lane_of_fake)
    return sensor


@pytest.fixture(autouse=True)
def lane_of_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    from portsentry.sensors.stealth import StealthSensor

    original = StealthSensor.lane

    def lane(self: Any) -> Any:
        if "_fake_lane" in self.__dict__:
            return self.__dict__["_fake_lane"]
        return original.fget(self)  # type: ignore[attr-defined]

    monkeypatch.setattr(StealthSensor, "lane", property(lane))


def config(**changes: Any) -> Config:
    base = Config(source="t", block_tcp=1, kill_route=ROUTE, protect_gateways=False, protect_resolvers=False)
    return dataclasses.replace(base, **changes)


def syslog_journal(tmp_path: Path) -> Journal:
    return Journal(SyslogWriter(str(tmp_path / "log")), stderr=io.StringIO())


# -- when the lane may be on --------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "why"), [
    ({}, None),
    ({"fast_lane": "off"}, 'FAST_LANE="off"'),
    ({"block_tcp": 0}, "BLOCK_TCP is not 1"),
    ({"block_tcp": 2, "kill_run_cmd": "true"}, "BLOCK_TCP is not 1"),
    ({"kill_route": None, "kill_hosts_deny": None}, "no blocking step is configured"),
    ({"ban_backend": "nftables"}, "blocks go through a native ban backend"),
    ({"kill_run_cmd": "true", "kill_run_cmd_first": True},
     "KILL_RUN_CMD_FIRST runs a command before the block"),
    ({"scan_trigger": 2}, "SCAN_TRIGGER is above 1"),
    ({"resolve_host": True}, "RESOLVE_HOST looks up names for the lines"),
    ({"ban_rate_limit_net": 3}, "BAN_RATE_LIMIT_NET caps bans per network"),
])
def test_the_lane_is_on_only_where_a_first_syn_is_a_line_then_a_block(tmp_path, changes, why):
    conf = config(**changes)
    engine = Engine(engine_settings(conf), frozenset())
    assert why_off(conf, engine, syslog_journal(tmp_path), fake_sensor(FakeLane())) == why


def test_the_lane_stays_off_without_syslog_published_ports_or_a_lane(tmp_path):
    conf = config()
    engine = Engine(engine_settings(conf), frozenset())
    assert why_off(conf, engine, Journal(None), fake_sensor(FakeLane())) == \
        "lines go to the systemd journal, not syslog"
    assert why_off(conf, engine, syslog_journal(tmp_path), fake_sensor(FakeLane(), published=True)) == \
        "ports are published by DNAT or REDIRECT here"
    assert why_off(conf, engine, syslog_journal(tmp_path), fake_sensor(None)) == \
        "no TCP stealth mode with the AF_PACKET capture"
    # The capture is there, its lane could not be: status says why, not that nothing watches.
    missing = "the compiled fast lane is not installed (no C compiler when the package was built)"
    assert why_off(conf, engine, syslog_journal(tmp_path), fake_sensor(None), missing) == missing


# -- what is compiled ---------------------------------------------------------------------------


def test_the_port_table_has_one_mode_per_port_and_none_where_a_service_listens_or_two_modes_watch():
    watches = (Watch(Mode.ATCP, below=1024, exclude=frozenset({113})),
               Watch(Mode.STCP, ports=frozenset({79, 2000})),
               Watch(Mode.AUDP, below=1024))
    table = port_table(fake_sensor(listening=frozenset({22}), watches=watches))
    assert len(table) == 65536
    assert table[80] == 2 and table[1023] == 2  # atcp
    assert table[2000] == 1  # stcp only
    assert table[79] == 0  # both watch it: the engine makes two hits of one SYN
    assert table[22] == 0 and table[113] == 0 and table[1024] == 0 and table[0] == 0


def test_the_deny_list_holds_every_source_the_engine_or_the_sensor_would_not_ban(tmp_path):
    (tmp_path / "ignore").write_text("198.18.5.0/24\n")
    ignore = IgnoreSource(str(tmp_path / "ignore"), lambda: [])
    conf = config(sensitive_networks=(ip_network("198.19.0.0/16"),))
    networks = set(deny_networks(conf, ignore, 1000.0, [ip_address("198.18.0.254")], fake_sensor()))
    assert {ip_network("198.18.5.0/24"), ip_network("198.19.0.0/16"), ip_network("198.18.0.254/32"),
            ip_network("198.18.0.1/32"), ip_network("198.18.0.255/32"), ip_network("127.0.0.0/8"),
            ip_network("255.255.255.255/32"), ip_network("ff00::/8")} <= networks


@dataclasses.dataclass
class Rig:
    keeper: LaneKeeper
    lane: FakeLane
    sensor: Any
    engine: Engine
    journal: Journal
    ignore: IgnoreSource
    said: list[str]


def compiled(tmp_path: Path, conf: Config | None = None) -> Rig:
    conf = conf or config(state_dir=str(tmp_path))
    lane = FakeLane()
    sensor = fake_sensor(lane)
    engine = Engine(engine_settings(conf), frozenset())
    journal = syslog_journal(tmp_path)
    ignore = IgnoreSource(None, lambda: [])
    said: list[str] = []
    keeper = LaneKeeper(said.append, str(tmp_path))
    keeper.compile([sensor], conf, engine, journal, ignore, frozenset(), 1000.0)
    return Rig(keeper, lane, sensor, engine, journal, ignore, said)


def test_compile_pushes_every_table_once_and_only_what_changed_later(tmp_path):
    r = compiled(tmp_path)
    assert r.keeper.reason is None and r.lane.enabled
    assert {"route", "syslog", "ports", "local", "deny", "ignore", "record", "allow"} <= set(r.lane.kinds())
    syslog = dict(r.lane.calls)["syslog"]
    assert syslog == (str(tmp_path / "log"), "<29>", f" portsentry[{os.getpid()}]: ")
    conf = config(state_dir=str(tmp_path))
    r.lane.calls.clear()
    r.keeper.compile([r.sensor], conf, r.engine, r.journal, r.ignore, frozenset(), 1001.0)
    assert r.lane.kinds() == ["allow"]  # nothing changed: nothing pushed
    r.lane.calls.clear()
    gateway = frozenset({ip_address("198.18.0.254")})
    r.keeper.compile([r.sensor], conf, r.engine, r.journal, r.ignore, gateway, 1002.0)
    assert r.lane.kinds() == ["deny", "allow"]
    deny = dict(r.lane.calls)["deny"]
    assert ip_network("198.18.0.254/32") in deny and r.lane.enabled


def test_a_kill_route_c_renders_differently_keeps_the_lane_off_and_says_so(tmp_path):
    conf = config(state_dir=str(tmp_path))
    lane = FakeLane()
    lane.render_wrong = True
    said: list[str] = []
    keeper = LaneKeeper(said.append, str(tmp_path))
    keeper.compile([fake_sensor(lane)], conf, Engine(engine_settings(conf), frozenset()),
                   syslog_journal(tmp_path), IgnoreSource(None, lambda: []), frozenset(), 1000.0)
    assert not lane.enabled
    assert keeper.reason is not None and "KILL_ROUTE renders differently" in keeper.reason


def test_a_change_that_turns_it_off_is_said_and_status_tells_why(tmp_path):
    r = compiled(tmp_path)
    conf = config(state_dir=str(tmp_path), scan_trigger=3)
    r.engine.update_settings(engine_settings(conf))
    r.keeper.compile([r.sensor], conf, r.engine, r.journal, r.ignore, frozenset(), 1001.0)
    assert not r.lane.enabled
    assert r.said == ["adminalert: fast lane off: SCAN_TRIGGER is above 1"]
    assert r.keeper.describe() == "off: SCAN_TRIGGER is above 1"


def test_the_rate_caps_share_is_what_the_guard_leaves_free(tmp_path):
    conf = config(state_dir=str(tmp_path), ban_rate_limit=3)
    r = compiled(tmp_path, conf)
    assert dict(r.lane.calls)["allow"] == (0, 3)
    r.engine.guard.rate_limited(ip_address("198.18.0.20"), 1000.5)  # a ban of the Python path
    assert ("claim", None) in r.lane.calls  # its slot taken from the lane's share at once
    r.lane.calls.clear()
    r.keeper.handled(r.engine, 1001.0)
    assert dict(r.lane.calls)["allow"] == (0, 2)


# -- pins ---------------------------------------------------------------------------------------


def test_the_lane_is_pinned_to_every_source_the_engine_holds_and_let_go_when_it_is_lifted(tmp_path):
    r = compiled(tmp_path)
    probe = Probe(SCANNER, 80, Mode.ATCP, KIND_SYN, HERE)
    outcome = r.engine.observe(probe, 1000.0)
    assert outcome.decision is Decision.BLOCK
    assert SCANNER.packed in r.lane.pins  # pinned the moment the r.engine decided it
    block = next(a for a in outcome.actions if isinstance(a, Block))
    r.engine.finished(block, True, 1000.1)
    other = ip_address("198.18.0.11")
    r.engine.apply_ban_changes([(other, True)])  # `block` by hand
    assert other.packed in r.lane.pins
    r.engine.apply_ban_changes([(SCANNER, False), (other, False)])  # expired, unblocked
    assert r.lane.pins == set()


def test_a_failed_block_lets_its_source_go_and_a_resync_pins_what_the_store_holds(tmp_path):
    r = compiled(tmp_path)
    outcome = r.engine.observe(Probe(SCANNER, 80, Mode.ATCP, KIND_SYN, HERE), 1000.0)
    block = next(a for a in outcome.actions if isinstance(a, Block))
    r.engine.finished(block, False, 1000.1)
    assert r.lane.pins == set()  # the next hit tries again, in the r.lane too
    banned = [ip_address("198.18.0.30").packed, ip_address("fd00::30").packed]
    r.engine.sync_bans(banned)
    assert r.lane.pins == set(banned)


def test_a_new_lane_after_a_reload_starts_pinned_to_what_the_engine_holds(tmp_path):
    r = compiled(tmp_path)
    r.engine.apply_ban_changes([(SCANNER, True)])
    new_lane = FakeLane()
    new_sensor = fake_sensor(new_lane)
    conf = config(state_dir=str(tmp_path))
    r.keeper.compile([new_sensor], conf, r.engine, r.journal, r.ignore, frozenset(), 1001.0)
    lane: object = r.keeper.lane
    assert lane is new_lane and new_lane.pins == {SCANNER.packed} and new_lane.enabled


# -- reports ------------------------------------------------------------------------------------


def act(source: str = "198.18.0.10", pid: int = -1, pipe: int = -1, sent: bool = True,
        line: int = -1) -> Act:
    return Act(seq=1, source=ip_address(source), destination=HERE, port=80, source_port=40000, mode=Mode.ATCP,
               sent=sent, pid=pid, pipe=pipe, spawn_errno=0, record_errno=0, line=line, at=1000.0,
               started=time.monotonic())


class Lines:
    """A LogWriter that keeps what reached 'syslog'."""

    path = "fake"
    last_error = ""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, message: str, severity: int, fields: Any) -> bool:
        self.lines.append(message)
        return True

    def flush(self) -> bool:
        return True

    def close(self) -> None:
        pass


def lane_daemon(tmp_path: Path, ignore_file: str | None = None) -> tuple[Any, Lines, io.StringIO,
                                                                         list[Block]]:
    from portsentry.responders.classic import ClassicResponder
    from portsentry.responders.hostsdeny import HostsDeny
    from portsentry.service.daemon import Daemon

    syslog, stderr = Lines(), io.StringIO()
    journal = Journal(syslog, stderr=stderr)
    conf = config(state_dir=str(tmp_path))
    carried: list[Block] = []
    done = threading.Event()

    class Responder(ClassicResponder):
        def carry_out(self, block: Block, duration: Any, keeper: Any = None) -> bool:
            carried.append(block)
            done.set()
            return True

    daemon: Any = Daemon(conf, [Mode.ATCP], journal, IgnoreSource(ignore_file, lambda: []), [],
                         Responder(HostsDeny(str(tmp_path / "hosts.deny")), journal.log, 1.0),
                         clock=lambda: 1000.0)
    daemon.done = done
    return daemon, syslog, stderr, carried


def test_a_report_is_decided_by_the_engine_its_line_not_sent_twice_and_its_block_carries_the_shell(tmp_path):
    from portsentry.sensors.base import Hit

    daemon, syslog, stderr, carried = lane_daemon(tmp_path)
    report = act()
    probe = Probe(report.source, report.port, report.mode, KIND_SYN, report.destination)
    daemon._blocks.start()
    try:
        daemon.handle(Hit(probe, lane=report))
        assert daemon.done.wait(5)
    finally:
        daemon._blocks.close()
    detection = messages.detection(probe)
    assert detection not in syslog.lines  # the lane wrote it
    assert stderr.getvalue().splitlines()[0] == detection  # every other sink still has it
    assert len(carried) == 1 and carried[0].started == Started()  # lane-made, no shell to wait for
    assert daemon.engine.is_blocked(Mode.ATCP, report.source)
    daemon._run_main_calls()
    assert daemon.lane.settled == daemon.lane.acted == 1


def test_a_report_the_engine_does_not_block_is_said_and_its_line_is_not_repeated(tmp_path):
    from portsentry.sensors.base import Hit

    ignore = tmp_path / "ignore"
    ignore.write_text("198.18.0.10\n")  # edited a moment before: the lane's tables were behind
    daemon, syslog, _stderr, carried = lane_daemon(tmp_path, str(ignore))
    report = act()
    probe = Probe(report.source, report.port, report.mode, KIND_SYN, report.destination)
    daemon.handle(Hit(probe, lane=report))
    assert carried == [] and daemon.lane.disagreed == 1
    warning = [line for line in syslog.lines if "fast lane began a block" in line]
    assert warning == ["adminalert: WARNING: the fast lane began a block of 198.18.0.10 that the daemon did "
                       "not make (ignored); its tables were a moment behind"]
    assert messages.detection(probe) not in syslog.lines


def test_a_lane_shell_no_block_waits_for_is_seen_through_and_a_route_it_made_is_said(tmp_path):
    from portsentry.responders.shell import _spawn

    said: list[str] = []
    keeper = LaneKeeper(said.append, str(tmp_path))
    pid, pipe = _spawn("echo made")
    ran: list[Any] = []

    def submit(work: Any) -> None:
        ran.append(work)
        work()

    keeper.disagreed_with(act(pid=pid, pipe=pipe), "ignored", submit)
    assert len(ran) == 1
    assert said[-1] == ("adminalert: WARNING: the fast lane's KILL_ROUTE for 198.18.0.10 ran, and no ban "
                        "records it")
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped


def test_each_block_over_frees_its_own_line_of_the_record_in_any_order(tmp_path):
    r = compiled(tmp_path)
    record = tmp_path / lanes.RECORD_FILE
    lines = [f"{n} 1000.0 198.18.0.{n} 80 atcp".ljust(RECORD_SLOT - 1) + "\n" for n in (1, 2)]
    record.write_bytes("".join(lines).encode())  # as the lane wrote them, lines 0 and 1
    first = r.keeper.started(act(line=0))
    second = r.keeper.started(act("198.18.0.2", line=1))
    r.keeper.block_done(second.line)  # the later ban is in the store first
    assert record.read_bytes() == lines[0].encode() + bytes(RECORD_SLOT)
    r.keeper.block_done(first.line)
    assert record.read_bytes() == bytes(2 * RECORD_SLOT)
    r.keeper.disagreed_with(act("198.18.0.3", line=-1), "ignored", lambda work: None)  # none written
    assert record.read_bytes() == bytes(2 * RECORD_SLOT)


# -- the record at start ------------------------------------------------------------------------


def test_bans_a_stopped_daemon_left_in_the_record_are_recorded_at_start_and_said(tmp_path):
    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import BanStore
    from portsentry.responders.hostsdeny import HostsDeny

    store = BanStore(str(tmp_path / "bans.sqlite3"))
    bans = BanManager(store, None, HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(base=3600), print)
    record = tmp_path / lanes.RECORD_FILE
    record.write_text("1 1000.5 198.18.0.10 80 atcp\n2 1000.6 fd00::10 22 stcp\n3 1000.7 198.18.0.1")
    said: list[str] = []
    recorded = replay(str(record), bans, lambda a, p, m: f"ALL: {a}", said.append)
    # The cut-short third line is nothing that can be known; the others get history lines.
    assert [(str(probe.source), probe.port, probe.mode, at) for probe, at in recorded] == [
        ("198.18.0.10", 80, Mode.ATCP, 1000.5), ("fd00::10", 22, Mode.STCP, 1000.6)]
    ban = store.get(ip_address("198.18.0.10"))
    assert ban is not None and ban.routed and ban.active(1001.0) and ban.hosts_deny_line == "ALL: 198.18.0.10"
    assert store.get(ip_address("fd00::10")) is not None
    assert said[0] == ("adminalert: Host 198.18.0.10 was blocked by the fast lane and not recorded before "
                       "the daemon stopped: recorded now")
    assert record.read_text() == ""
    assert replay(str(record), bans, lambda a, p, m: None, said.append) == []  # nothing twice
    store.close()


def test_replay_records_each_probe_kind_and_reads_lines_from_before_kinds(tmp_path):
    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import BanStore
    from portsentry.core.probe import KIND_FIN, KIND_NULL, KIND_XMAS
    from portsentry.responders.hostsdeny import HostsDeny

    store = BanStore(str(tmp_path / "bans.sqlite3"))
    bans = BanManager(store, None, HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(base=3600), print)
    record = tmp_path / lanes.RECORD_FILE
    # A lane that took only SYNs wrote no letter; a letter it does not know is no line at all.
    record.write_text("1 1000.5 198.18.0.10 80 atcp F\n2 1000.6 fd00::10 22 stcp X\n"
                      "3 1000.7 198.18.0.11 79 stcp N\n4 1000.8 198.18.0.12 81 atcp\n"
                      "5 1000.9 198.18.0.13 82 atcp Q\n6 1001.0 198.18.0.14 1 atcp S S\n")
    recorded = replay(str(record), bans, lambda a, p, m: None, lambda _line: None)
    assert [(str(probe.source), probe.kind) for probe, _at in recorded] == [
        ("198.18.0.10", KIND_FIN), ("fd00::10", KIND_XMAS), ("198.18.0.11", KIND_NULL),
        ("198.18.0.12", KIND_SYN)]
    ban = store.get(ip_address("198.18.0.10"))
    assert ban is not None and ban.reason == KIND_FIN
    assert store.get(ip_address("198.18.0.13")) is None and store.get(ip_address("198.18.0.14")) is None
    store.close()


def test_no_record_file_is_nothing_to_replay(tmp_path):
    assert replay(str(tmp_path / "none"), None, lambda a, p, m: None, print) == []  # type: ignore[arg-type]


def test_engine_observe_made_counts_the_lane_ban_against_the_cap_and_never_refuses_it():
    conf = config(ban_rate_limit=1)
    engine = Engine(engine_settings(conf), frozenset())
    first = engine.observe(Probe(SCANNER, 80, Mode.ATCP, KIND_SYN, HERE), 1000.0)
    assert first.decision is Decision.BLOCK
    made = engine.observe(Probe(ip_address("198.18.0.11"), 80, Mode.ATCP, KIND_SYN, HERE), 1000.1, made=True)
    assert made.decision is Decision.BLOCK  # within its allowance when it acted: counted, not refused
    assert engine.guard.free_bans(1000.2) == 0
    assert isinstance(made.actions[0], Log) and isinstance(made.actions[-1], Block)
    assert made.actions[-1].steps == (Step(StepKind.ROUTE, ROUTE),)


def test_a_new_lanes_share_of_the_rate_cap_counts_only_its_own_bans(tmp_path):
    r = compiled(tmp_path)
    r.keeper.started(act())  # the lane before the reload began it; its block is still running
    new_lane = FakeLane()
    conf = config(state_dir=str(tmp_path))
    r.keeper.compile([fake_sensor(new_lane)], conf, r.engine, r.journal, r.ignore, frozenset(), 1001.0)
    r.keeper.started(act("198.18.0.11"))  # the new lane's first
    r.keeper.handled(r.engine, 1001.0)
    assert [args for kind, args in new_lane.calls if kind == "allow"][-1][0] == 1  # the new lane's own

def test_pins_are_kept_only_while_the_lane_may_act(tmp_path):
    # A host that only logs (no blocking step) has the lane off: a million bans at start cost
    # it no memory and no time; turned on by a reload, it is pinned to every one first.
    conf = config(state_dir=str(tmp_path), kill_route=None, kill_hosts_deny=None)
    lane = FakeLane()
    sensor = fake_sensor(lane)
    engine = Engine(engine_settings(conf), frozenset())
    engine.sync_bans([SCANNER.packed])
    keeper = LaneKeeper(lambda _line: None, str(tmp_path))
    journal, ignore = syslog_journal(tmp_path), IgnoreSource(None, lambda: [])
    keeper.compile([sensor], conf, engine, journal, ignore, frozenset(), 1000.0)
    assert keeper.reason == "no blocking step is configured" and lane.pins == set()
    engine.apply_ban_changes([(ip_address("198.18.0.11"), True)])
    assert lane.pins == set()
    on = config(state_dir=str(tmp_path))
    engine.update_settings(engine_settings(on))
    keeper.compile([sensor], on, engine, journal, ignore, frozenset(), 1001.0)
    assert lane.enabled and lane.pins == {SCANNER.packed, ip_address("198.18.0.11").packed}
    engine.update_settings(engine_settings(conf))
    keeper.compile([sensor], conf, engine, journal, ignore, frozenset(), 1002.0)
    assert not lane.enabled and lane.pins == set()


def test_status_says_when_the_lane_failed_inside(tmp_path):
    r = compiled(tmp_path)
    assert r.keeper.describe() == "on (0 blocks begun, 0 not taken up)"
    r.lane.failures = 2
    assert r.keeper.describe() == ("on (0 blocks begun, 0 not taken up); 2 lane errors, "
                                   "0 unreadable lane messages")
