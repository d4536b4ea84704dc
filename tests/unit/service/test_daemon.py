"""The daemon shell's own bookkeeping (its probe path is covered by the system tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from tests.unit.service.daemons import bare_daemon


def test_an_exception_in_maintenance_is_said_and_the_next_round_runs():
    # issue 10: one exception left _tick_running set, and no tick (expiry, guards) ever ran again.
    import time
    from ipaddress import ip_address

    from portsentry.service.maintenance import Findings, Maintenance

    class Quiet:  # the ban store: nobody else changed anything
        def claim_unreported(self, limit: int) -> list[object]:
            return []

    class Broken:
        store = Quiet()
        backend = None
        expired: ClassVar[list[float]] = []

        def repair(self, now: float) -> None:
            raise RuntimeError("repair broke")

        def catch_up(self) -> int:
            return 0

        def expire(self, now: float) -> list[object]:
            self.expired.append(now)
            return []

        def prune(self, now: float) -> int:
            return 0

    said: list[str] = []
    found: list[Findings] = []
    gateway = frozenset({ip_address("198.18.0.254")})
    maintenance = Maintenance(Broken(), lambda: gateway, found.append, said.append,  # type: ignore[arg-type]
                              interval=0.05, repair_every=0.0, clock=time.time)
    maintenance._follow = lambda now: ([], None)  # type: ignore[method-assign]
    maintenance.start(0, 0)
    deadline = time.monotonic() + 5
    while len(found) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    maintenance.stop()
    assert len(found) >= 3 and all(f.protected == gateway for f in found)
    assert len(Broken.expired) >= 3  # expiry still ran in every round
    assert said[0] == ("adminalert: ERROR: internal error in the maintenance tick: "
                       "RuntimeError('repair broke')")
    assert maintenance.errors >= 3


def test_a_probe_that_meets_a_bug_is_skipped_and_detection_goes_on(tmp_path):
    daemon, said = bare_daemon(tmp_path)
    handled = []

    def handle(hit):
        if hit == "bad":
            raise ValueError("bug")
        handled.append(hit)

    for hit in ("bad", "good"):
        daemon._guarded(handle, hit)
    assert handled == ["good"] and daemon.internal_errors == 1
    assert "internal error on a probe, skipped: ValueError('bug')" in said.getvalue()
    daemon.shutdown()


def test_sigusr1_reopens_the_event_log_by_name_and_leaves_the_configuration_alone(tmp_path):
    # logrotate's postrotate sends SIGUSR1 (packaging/logrotate/portsentry): the rotated file is
    # let go at once, the new one created, and nothing is reloaded.
    import signal
    import sys
    import threading

    from portsentry.journal.events import EventLog
    from portsentry.journal.telemetry import Telemetry

    events = tmp_path / "events.jsonl"
    daemon, said = bare_daemon(tmp_path, telemetry=Telemetry(EventLog(str(events))))
    reloads: list[int] = []
    daemon.reloader = lambda: reloads.append(1)
    events.rename(tmp_path / "events.jsonl.1")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                     signal.SIGPIPE, signal.SIGUSR1)}
    interval = sys.getswitchinterval()
    stopper = threading.Timer(0.5, daemon.request_stop)
    try:
        daemon.install_signal_handlers()
        signal.raise_signal(signal.SIGUSR1)
        stopper.start()
        daemon.run()
    finally:
        stopper.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        sys.setswitchinterval(interval)
        daemon.telemetry.close()
    assert events.exists()  # opened again by name before any event was written
    assert said.getvalue().count("adminalert: PortSentry reopened its log files") == 1
    assert reloads == [] and "reloaded its configuration" not in said.getvalue()


class _SlowDetection:
    """stderr for the journal: writing the detection line takes a while (a slow syslog)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        import time

        if "scan from host" in text or "Connect from host" in text:
            time.sleep(0.05)
        self.lines.extend(line for line in text.splitlines() if line)
        return len(text)

    def flush(self) -> None:
        pass


def _blocking_daemon(tmp_path: Path, carry_out: Any) -> tuple[Any, _SlowDetection]:
    from portsentry.config.ignore import IgnoreSource
    from portsentry.config.settings import Config
    from portsentry.core.probe import Mode
    from portsentry.journal.journal import Journal
    from portsentry.responders.classic import ClassicResponder
    from portsentry.responders.hostsdeny import HostsDeny
    from portsentry.service.daemon import Daemon

    out = _SlowDetection()
    journal = Journal(None, stderr=out)  # type: ignore[arg-type]
    config = Config(source="t", state_dir=str(tmp_path), protect_gateways=False, protect_resolvers=False)

    class Responder(ClassicResponder):
        def carry_out(self, block: Any, duration: Any, keeper: Any = None) -> bool:
            return bool(carry_out(journal, block))

    daemon = Daemon(config, [Mode.TCP], journal, IgnoreSource(None, lambda: []), [],
                    Responder(HostsDeny(str(tmp_path / "hosts.deny")), journal.log, 1.0),
                    clock=lambda: 1000.0)
    return daemon, out


def _probe_and_block() -> tuple[Any, Any]:
    from ipaddress import ip_address

    from portsentry.core import messages
    from portsentry.core.actions import Block, Log, Step, StepKind
    from portsentry.core.probe import KIND_SYN, Mode, Probe

    probe = Probe(ip_address("198.18.0.7"), 79, Mode.ATCP, KIND_SYN)
    return Log(messages.detection(probe)), Block(probe, (Step(StepKind.ROUTE, "true"),))


def test_a_block_starts_before_the_detection_line_is_written_and_its_lines_still_follow_it(tmp_path):
    import threading

    started = threading.Event()

    def carry_out(journal: Any, block: Any) -> bool:
        started.set()
        journal.log(f"attackalert: Host {block.probe.source} has been blocked via wrappers")
        return True

    import time

    from portsentry.core.actions import SendBanner
    from portsentry.sensors.base import Hit

    daemon, out = _blocking_daemon(tmp_path, carry_out)
    detection, block = _probe_and_block()
    # A banner sent first (a classic mode's PORT_BANNER) that takes a while: the worker runs
    # meanwhile, before the detection line is even begun.
    slow_banner = Hit(block.probe, reply=lambda _data: time.sleep(0.05))
    daemon._blocks.start()
    try:
        daemon.perform([SendBanner("hello"), detection, block], slow_banner)
        # The worker started while the banner and the (slow) detection line were written...
        assert started.is_set()
    finally:
        daemon._blocks.close()
    # ... and its line came after the detection line all the same.
    assert out.lines == [detection.text, "attackalert: Host 198.18.0.7 has been blocked via wrappers"]


def test_a_block_the_full_queue_refuses_is_reported_after_the_detection_line(tmp_path):
    from portsentry.service.blockqueue import BlockQueue

    daemon, out = _blocking_daemon(tmp_path, lambda journal, block: True)
    detection, block = _probe_and_block()
    daemon.engine._pending[block.probe.source] = []  # as observe() leaves it
    daemon._blocks = BlockQueue(lambda b: True, lambda *a: None, daemon.journal.log, workers=0, size=1)
    daemon._blocks.submit(block)  # the only slot
    daemon.perform([detection, block])
    assert out.lines[0] == detection.text
    assert out.lines[1].startswith("adminalert: ERROR: 1 block(s) not started")
    assert out.lines[2:] == ["attackalert: ERROR: Could not block host 198.18.0.7/198.18.0.7!!"]
    assert block.probe.source not in daemon.engine._pending  # forgotten


def test_a_reload_that_turns_the_kernel_ban_on_pushes_its_guards_before_the_new_rules(tmp_path):
    """KERNEL_BAN="off" at start, then a reload to "auto": the new sensors put the first-probe ban
    rules in the kernel, but the daemon had made no KernelBans at start, so the guard sets stayed
    empty (own, ignored and gateway addresses banned on their first probe) and caught entries were
    never settled."""
    import dataclasses
    from ipaddress import ip_network

    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import MEMORY, BanStore
    from portsentry.config.ignore import IgnoreSource
    from portsentry.core.probe import Mode
    from portsentry.responders.hostsdeny import HostsDeny
    from tests.unit.service.test_kernelbans import CatchingKernel

    kernel = CatchingKernel()
    bans = BanManager(BanStore(MEMORY), kernel, HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(),
                      print)
    daemon, _said = bare_daemon(tmp_path, bans=bans)
    daemon.modes = (Mode.STCP,)  # the first-probe ban is the stealth capture's
    daemon.config = dataclasses.replace(daemon.config, kernel_ban="off", block_tcp=1)
    daemon._kernel = None  # as __init__ makes it for KERNEL_BAN="off"
    (tmp_path / "ignore").write_text("198.18.9.0/24\n")
    ignored = IgnoreSource(str(tmp_path / "ignore"), lambda: [])
    new = dataclasses.replace(daemon.config, kernel_ban="auto",
                              sensitive_networks=(ip_network("198.19.0.0/16"),))
    daemon.reloader = lambda: (new, ignored)
    guards_when_rules_came: list[Any] = []

    def sensors(config: object) -> list[object]:
        guards_when_rules_came.append(kernel.guards)
        return [_FakeSensor((1,))]  # one that watches: a reload watching nothing is refused

    daemon.sensor_factory = sensors
    try:
        assert daemon.reload()
    finally:
        daemon.shutdown()
    assert guards_when_rules_came and guards_when_rules_came[0] is not None
    protect, nokernel = guards_when_rules_came[0]
    assert ip_network("198.18.9.0/24") in protect and ip_network("198.19.0.0/16") in nokernel
    assert daemon._kernel is not None  # and its caught entries get settled from now on


class _FakeSensor:
    """A sensor with one readable handle, whose open() may fail as a capture can (NFLOG group
    taken, CAPTURE="nflog" refused, no CAP_NET_RAW)."""

    def __init__(self, ports: tuple[int, ...], fail: bool = False) -> None:
        import socket

        self.ports = ports
        self.fail = fail
        self.opened = 0
        self.closed = 0
        self.ticks: list[float] = []
        self._ends = socket.socketpair()

    def open(self) -> list[Any]:
        from portsentry.sensors.capture import CaptureError

        if self.fail:
            raise CaptureError(f"cannot open the capture for ports {self.ports}")
        self.opened += 1
        return [self._ends[0]]

    def read(self, handle: Any) -> list[Any]:
        return []

    def close(self) -> None:
        self.closed += 1
        for end in self._ends:
            end.close()

    def describe(self) -> list[str]:
        return [f"ports {self.ports}"]

    def tick(self, now: float) -> None:
        self.ticks.append(now)

    def capture_drops(self) -> int | None:
        return None

    def packet_drops(self) -> dict[str, int]:
        return {}

    def skip_sources(self, networks: Any) -> None:
        pass


def test_a_reload_whose_sensors_cannot_open_is_refused_and_the_old_sensors_watch_again(tmp_path):
    # A SIGHUP whose new ports needed a capture that could not be opened raised out of reload():
    # the main loop ended and the daemon stopped, its old sensors already closed.
    import dataclasses

    daemon, said = bare_daemon(tmp_path)
    first = _FakeSensor((1,))
    daemon.sensors = (first,)
    daemon.config = old = dataclasses.replace(daemon.config, tcp_ports=(1,))
    daemon.open()
    new = dataclasses.replace(old, tcp_ports=(1, 2))
    built: list[_FakeSensor] = []

    def factory(config: Any) -> list[_FakeSensor]:
        built.append(_FakeSensor(config.tcp_ports, fail=config.tcp_ports == (1, 2)))
        return [built[-1]]

    daemon.reloader = lambda: (new, daemon.ignore)
    daemon.sensor_factory = factory
    try:
        assert daemon.reload() is False
        assert daemon.config is old
        assert "reload refused, the running configuration stays in force: cannot open the capture " \
               "for ports (1, 2)" in said.getvalue()
        # The old configuration's sensors are open again, and theirs are the only handles watched.
        assert [sensor.ports for sensor in built] == [(1, 2), (1,)]
        assert daemon.sensors == (built[1],) and built[1].opened == 1
        watched = {key.data for key in daemon._selector.get_map().values() if key.data is not None}
        assert watched == {built[1]}
        assert "reloaded its configuration" not in said.getvalue()
    finally:
        daemon.shutdown()


class _IdleSensor(_FakeSensor):
    """A sensor whose ports were all taken: it opens and watches nothing, and says so."""

    def open(self) -> list[Any]:
        self.opened += 1
        return []


def test_a_reload_whose_sensors_watch_nothing_is_refused_and_the_old_sensors_watch_again(tmp_path):
    # TCP_PORTS changed to ports some service held: the new -tcp sensor bound none, logged 1.2's
    # "could not bind ANY TCP sockets. Shutting down.", and the reload went through: "reloaded its
    # configuration", a daemon that watched nothing, and status listing "TCP ports  bound".
    import dataclasses

    daemon, said = bare_daemon(tmp_path)
    first = _FakeSensor((1,))
    daemon.sensors = (first,)
    daemon.config = old = dataclasses.replace(daemon.config, tcp_ports=(1,))
    daemon.open()
    taken = dataclasses.replace(old, tcp_ports=(2,))
    built: list[_FakeSensor] = []

    def factory(config: Any) -> list[_FakeSensor]:
        built.append((_IdleSensor if config.tcp_ports == (2,) else _FakeSensor)(config.tcp_ports))
        return [built[-1]]

    daemon.reloader = lambda: (taken, daemon.ignore)
    daemon.sensor_factory = factory
    try:
        assert daemon.reload() is False
        assert daemon.config is old
        assert ("reload refused, the running configuration stays in force: with it no mode watches "
                "any port") in said.getvalue()
        assert "reloaded its configuration" not in said.getvalue()
        assert [sensor.ports for sensor in built] == [(2,), (1,)]
        assert built[0].closed == 1 and daemon.sensors == (built[1],)
        watched = {key.data for key in daemon._selector.get_map().values() if key.data is not None}
        assert watched == {built[1]}
    finally:
        daemon.shutdown()


def test_connections_held_for_a_hung_resolver_stay_few(tmp_path):
    # RESOLVE_HOST with a DNS server that never answers: each source's connections were held
    # open (64 a source, 256 sources: 16,384 descriptors) until its lookup timed out, far past
    # the usual limit of 1024 open files, after which accept(), the store and KILL_ROUTE fail.
    import threading
    from ipaddress import ip_address

    from portsentry.core.probe import KIND_CONNECT, Mode, Probe
    from portsentry.sensors.base import Hit
    from portsentry.service import daemon as module
    from portsentry.service.resolver import Resolver

    hung = threading.Event()

    def ptr(_address: str) -> str:
        hung.wait(10)
        return "late.example"

    daemon, _said = bare_daemon(tmp_path)
    daemon.resolver = Resolver(timeout=60.0, ptr=ptr)
    open_connections = [0]

    def closed() -> None:
        open_connections[0] -= 1

    try:
        for source in range(20):
            for _ in range(module.AWAIT_CAPACITY):
                open_connections[0] += 1
                probe = Probe(ip_address(f"198.18.1.{source}"), 1, Mode.TCP, KIND_CONNECT)
                daemon.handle(Hit(probe, close=closed))
        assert open_connections[0] <= getattr(module, "AWAIT_TOTAL", 0) < 1024
    finally:
        hung.set()
        daemon.shutdown()
    assert open_connections[0] == 0


def test_the_main_tick_goes_on_when_the_clock_is_set_back(tmp_path):
    # The main loop's once-a-second work waited for the wall clock to reach the time planned
    # before it was set back: an hour back, an hour without sensor ticks (a service started on
    # a watched port still banned by the kernel), summary lines or gauges.
    now = [10_000.0]
    daemon, _said = bare_daemon(tmp_path, clock=lambda: now[0])
    sensor = _FakeSensor((1,))
    daemon.sensors = (sensor,)
    try:
        daemon._maybe_tick()
        now[0] -= 3600.0  # NTP, or an administrator, sets the clock back an hour
        daemon._maybe_tick()
        now[0] += 1.0
        daemon._maybe_tick()
        assert sensor.ticks == [10_000.0, 6400.0, 6401.0]
    finally:
        daemon.shutdown()


def test_the_event_log_gives_a_below_trigger_hit_its_count_as_docs_events_md_says(tmp_path):
    # docs/events.md: below_trigger carries `count`, the hits so far from src in this mode; a
    # SIEM rule on it ("a source three hits from a ban") found no such field.
    import json
    from ipaddress import ip_address

    from portsentry.config.settings import Config, engine_settings
    from portsentry.core.probe import Mode, Probe
    from portsentry.journal.events import EventLog
    from portsentry.journal.telemetry import Telemetry
    from portsentry.sensors.base import Hit

    events = tmp_path / "events.jsonl"
    daemon, _said = bare_daemon(tmp_path, telemetry=Telemetry(EventLog(str(events))))
    daemon.engine.settings = engine_settings(Config(source="t", scan_trigger=3, block_tcp=0))
    probe = Probe(ip_address("198.18.0.2"), 31337, Mode.TCP, "Connect")
    try:
        for second in range(3):
            daemon._observe(Hit(probe), probe, 1000.0 + second)
    finally:
        daemon.shutdown()
        daemon.telemetry.close()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(line["event"], line.get("count")) for line in lines] == [
        ("below_trigger", 1), ("below_trigger", 2), ("probe", None)]


class _FieldSink:
    """A LogWriter that keeps each message with the journal fields it was given."""

    path = "sink"
    last_error = ""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, object]]] = []

    def emit(self, message: str, severity: int, fields: Any) -> bool:
        self.sent.append((message, dict(fields)))
        return True

    def flush(self) -> bool:
        return True

    def close(self) -> None:
        pass


def test_a_detection_line_carries_the_journal_fields_and_event_values_the_docs_query_by(tmp_path):
    # docs/events.md and docs/service.md show `journalctl PORTSENTRY_EVENT=... ` and list the
    # PORTSENTRY_* fields; they named PORTSENTRY_KIND, which no line carried, and queried
    # PORTSENTRY_EVENT=ban, a value no line has (the detection lines carry the engine's decision).
    import re
    from ipaddress import ip_address

    from portsentry.config.settings import Config, engine_settings
    from portsentry.core.actions import Decision
    from portsentry.core.probe import Mode, Probe
    from portsentry.sensors.base import Hit

    daemon, _said = bare_daemon(tmp_path)
    sink = _FieldSink()
    daemon.journal.syslog = sink
    daemon.engine.settings = engine_settings(Config(source="t", block_tcp=0))
    probe = Probe(ip_address("198.18.0.2"), 31337, Mode.STCP, "TCP SYN/Normal scan")
    try:
        daemon._observe(Hit(probe), probe, 1000.0)
    finally:
        daemon.shutdown()
    fields = next(fields for message, fields in sink.sent if "TCP SYN/Normal scan" in message)
    assert fields == {"PORTSENTRY_EVENT": "log", "PORTSENTRY_SRC": probe.source, "PORTSENTRY_PORT": 31337,
                      "PORTSENTRY_MODE": "stcp", "PORTSENTRY_KIND": "TCP SYN/Normal scan"}
    docs = Path(__file__).resolve().parents[3] / "docs"
    # The journal's parts of the two pages (service.md also names the SysV script's settings).
    text = ((docs / "events.md").read_text().partition("## In the systemd journal")[2]
            + (docs / "service.md").read_text().partition("**Native journal fields**")[2])
    assert set(re.findall(r"PORTSENTRY_[A-Z]+\b", text)) == set(fields)
    assert set(re.findall(r"PORTSENTRY_EVENT=(\w+)", text)) <= {decision.value for decision in Decision}


def test_a_reload_rebuilds_the_connect_modes_sockets_only_when_their_ports_change(tmp_path):
    import dataclasses

    from portsentry.core.probe import Mode

    daemon, _said = bare_daemon(tmp_path)
    daemon.modes = (Mode.TCP, Mode.UDP)
    daemon.config = old = dataclasses.replace(daemon.config, tcp_ports=(1,), udp_ports=(1,))
    built: list[Any] = []

    def factory(config: Any) -> list[_FakeSensor]:
        built.append(config)
        return [_FakeSensor(config.tcp_ports)]

    daemon.sensor_factory = factory
    stealth_only = dataclasses.replace(old, block_tcp=1, block_time=600, scan_trigger=2, kernel_ban="off",
                                       ban_rate_limit=5, capture="packet", advanced_ports_tcp=2000)
    daemon.reloader = lambda: (stealth_only, daemon.ignore)
    try:
        assert daemon.reload() and built == [] and daemon.config is stealth_only
        moved = dataclasses.replace(stealth_only, udp_ports=(1, 2))
        daemon.reloader = lambda: (moved, daemon.ignore)
        assert daemon.reload() and built == [moved]
        daemon.modes = (Mode.TCP, Mode.STCP)  # the stealth capture holds the first-probe ban
        daemon.reloader = lambda: (old, daemon.ignore)
        assert daemon.reload() and built == [moved, old]
    finally:
        daemon.shutdown()


def test_a_broken_ignore_file_edit_is_said_within_a_second_not_at_the_next_probe(tmp_path):
    # The edit was reported only when a probe came: on a quiet host, an admin who broke the file
    # heard nothing, and learnt of it (if at all) in the middle of the next scan.
    from portsentry.config.ignore import IgnoreSource

    now = [1000.0]
    daemon, said = bare_daemon(tmp_path, clock=lambda: now[0])
    (tmp_path / "ignore").write_text("198.18.9.0/24\n")
    daemon.ignore = IgnoreSource(str(tmp_path / "ignore"), lambda: [])
    daemon.ignore.load()
    try:
        daemon._maybe_tick()
        (tmp_path / "ignore").write_text("198.18.9.0/24\n198.18.300.1\n")
        now[0] += 1.0
        daemon._maybe_tick()
        assert "ignore list not reloaded" in said.getvalue() and "198.18.300.1" in said.getvalue()
        now[0] += 1.0
        daemon._maybe_tick()
        assert said.getvalue().count("ignore list not reloaded") == 1  # said once, not every second
    finally:
        daemon.shutdown()


def test_a_reload_that_moves_blocked_file_starts_the_new_one_as_the_start_does(tmp_path):
    # The start empties BLOCKED_FILE.<mode>, 1.2's list of this session's blocked hosts. A reload
    # that named another file appended to it as found: a list left by an earlier run, whose hosts
    # read as blocked this session. Now it holds this session's lines (carried from the old file,
    # which stays as it was), and the history file is never emptied.
    import dataclasses
    from ipaddress import ip_address

    from portsentry.core.probe import Mode, Probe

    daemon, _said = bare_daemon(tmp_path)
    history = tmp_path / "history"
    daemon.config = old = dataclasses.replace(daemon.config, blocked_file=str(tmp_path / "b1"),
                                              history_file=str(history))
    daemon.journal.blocked_file, daemon.journal.history_file = old.blocked_file, old.history_file
    (tmp_path / "b1.tcp").write_text("left by the last run\n")
    (tmp_path / "b2.tcp").write_text("1700000000 - 11/14/2023 22:13:20 Host: 198.18.5.5/198.18.5.5 "
                                     "Port: 1 TCP Blocked\n")
    try:
        daemon.open()
        assert (tmp_path / "b1.tcp").read_text() == ""
        daemon.journal.record(Probe(ip_address("198.18.0.2"), 1, Mode.TCP, "Connect"), 1000.0)
        session = (tmp_path / "b1.tcp").read_text()
        assert "198.18.0.2" in session
        new = dataclasses.replace(old, blocked_file=str(tmp_path / "b2"))
        daemon.reloader = lambda: (new, daemon.ignore)
        assert daemon.reload()
        assert (tmp_path / "b2.tcp").read_text() == session
        assert (tmp_path / "b1.tcp").read_text() == session
        daemon.journal.record(Probe(ip_address("198.18.0.3"), 1, Mode.TCP, "Connect"), 1001.0)
        assert "198.18.0.3" in (tmp_path / "b2.tcp").read_text()
        assert "198.18.0.3" not in (tmp_path / "b1.tcp").read_text()
        kept = history.read_text()
        # A BLOCKED_FILE whose per-mode file is the history file: it is not emptied.
        clash = dataclasses.replace(old, blocked_file=str(tmp_path / "hist"),
                                    history_file=str(tmp_path / "hist.tcp"))
        (tmp_path / "hist.tcp").write_text(kept)
        daemon.reloader = lambda: (clash, daemon.ignore)
        assert daemon.reload()
        assert (tmp_path / "hist.tcp").read_text() == kept
    finally:
        daemon.shutdown()


def test_a_ban_the_kernel_s_rate_cap_refuses_is_said_as_refused_not_as_a_failure(tmp_path):
    # The engine's guard let the scan's ban through, the kernel's BAN_RATE_LIMIT slots did not
    # (bans.lifecycle _claim_slot): nothing was tried, so nothing "could not" be blocked.
    from portsentry.bans.lifecycle import BanManager, BanPolicy
    from portsentry.bans.store import MEMORY, BanStore
    from tests.unit.bans.test_lifecycle import Kernel

    kernel = Kernel()
    kernel.claim_ban_slot = lambda address: False  # type: ignore[method-assign]
    daemon, out = _blocking_daemon(tmp_path, lambda journal, block: True)
    bans = BanManager(BanStore(MEMORY), kernel, daemon.responder.hosts_deny, BanPolicy(base=60),
                      daemon.journal.log)
    daemon.bans = bans
    detection, block = _probe_and_block()
    daemon.engine._pending[block.probe.source] = []  # as observe() leaves it
    daemon._blocks.start()
    try:
        daemon.perform([detection, block])
    finally:
        daemon._blocks.close()
    daemon._run_main_calls()
    assert out.lines == [detection.text, "attackalert: Host: 198.18.0.7/198.18.0.7 is not blocked: ban "
                         "rate limit reached (BAN_RATE_LIMIT's slots in the kernel are taken by this "
                         "minute's bans)"]
    assert block.probe.source not in daemon.engine._pending  # the next hit is decided afresh
