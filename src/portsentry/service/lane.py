"""The daemon's side of the fast lane (sensors/lane.c): what it compiles into it, and what it does
with the lane's reports.

The lane may act only where the engine would block a fresh source on its first TCP stealth
probe (SYN, FIN, NULL, XMAS), and do only the first part of that block: the detection line, a
record, KILL_ROUTE. So this keeper
- turns it on only when that holds for the configuration (service.lane_tables.why_off says why
  not: status shows it), and otherwise leaves it off, every packet then going through the daemon
  as before;
- compiles the tables the lane decides with (service.lane_tables), at start, at a reload and at
  each tick when they change, with the rate cap's share, which a ban the engine starts itself
  claims from at once (BanGuard.claim: one budget for both);
- keeps the lane's pins equal to what the engine holds (Engine.holding/released), so the lane
  never acts for a source the engine knows, and marks each read decided (`handled`) only after
  the engine has seen it;
- replays each report through the engine (`adopt`), which must agree: then the block goes on as
  any other, its ROUTE step waiting for the lane's shell; if the engine disagrees (a table was a
  moment stale) the report is said, and the shell is seen through on a worker;
- keeps the lane's record file (STATE_DIR/lane-record, written by C before KILL_ROUTE starts):
  emptied once every ban in it is in the ban store; what a daemon that stopped first left there
  is recorded at the next start (service.lane_replay).

Thread: the main loop, except `reaped` (a responder thread; a counter in C).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from ipaddress import ip_address

from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config
from portsentry.core import messages
from portsentry.core.actions import Block, Started, StepKind
from portsentry.core.engine import Engine
from portsentry.core.probe import IPAddress, Mode, Protocol
from portsentry.journal.journal import Journal
from portsentry.journal.syslog import LOG_DAEMON, LOG_NOTICE, SyslogWriter
from portsentry.responders.shell import wait_shell
from portsentry.responders.substitute import substitute
from portsentry.sensors.base import Sensor
from portsentry.sensors.lane import Act, Lane, LaneUnavailable, free_line
from portsentry.sensors.stealth import StealthSensor
from portsentry.service.lane_replay import RECORD_FILE
from portsentry.service.lane_tables import Tables as Tables
from portsentry.service.lane_tables import deny_networks as deny_networks
from portsentry.service.lane_tables import port_table as port_table
from portsentry.service.lane_tables import why_off as why_off

SEE_THROUGH_TIMEOUT = 30.0  # seconds a shell no block waits for is given (COMMAND_TIMEOUT's default)
NO_CAP = 1 << 62
Logger = Callable[[str], None]
Submit = Callable[[Callable[[], None]], object]


class LaneKeeper:
    def __init__(self, log: Logger, state_dir: str) -> None:
        self._log = log
        self.path = os.path.join(state_dir, RECORD_FILE)
        self.lane: Lane | None = None
        self.sensor: StealthSensor | None = None
        self.reason: str | None = "not started"
        self._tables: Tables | None = None
        self._ports_from: tuple[object, ...] = ()
        self._ports = b""
        self._record = -1
        self.acted = 0  # reports taken in, from every lane this run
        self.settled = 0  # of them, blocks done (recorded) or given up
        self._before = 0  # of them, from the lanes before this one (its own count starts at 0)
        self.disagreed = 0
        self.broken: str | None = None  # why the lane can never be on again this run
        self._bound: tuple[tuple[Sensor, ...], Lane | None] = ((), None)
        # Pins are kept only while the lane may act: off (e.g. no blocking step, as on a host
        # that only logs) a million bans cost it no memory and the start no time.
        self._pinned = False

    # -- binding ------------------------------------------------------------------------------

    def bind(self, sensors: Sequence[Sensor], engine: Engine) -> None:
        """After the sensors opened (start, reload): the lane in front of the new capture, if
        any; it stays off, and unpinned, until compile() turns it on."""
        self.sensor = next((s for s in sensors
                            if isinstance(s, StealthSensor) and s.lane is not None), None)
        self.lane = self.sensor.lane if self.sensor is not None else None
        self._bound = (tuple(sensors), self.lane)
        self._tables = None
        engine.holding = self._hold
        engine.released = self._release
        engine.resynced = lambda: self._resync(engine)
        engine.guard.claim = lambda now: self._claim(engine, now)
        self._pinned = False
        if self.lane is None:
            return
        if self._record < 0:
            try:
                # Read-write: the lane maps it (sensors/lane.c, RECORD_SLOTS).
                self._record = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as error:
                self._log(messages.config_error(f"cannot open the fast lane's record {self.path}: {error}"))
        # Blocks the last lane began may still be running: the counts go on, and the new lane's
        # share of the rate cap is what it made past _before. They free their lines themselves.
        self._before = self.acted
        try:
            self.lane.set_record(self._record)
        except LaneUnavailable as error:
            self._log(messages.config_error(str(error)))
            self.close()  # the lane stays off: "its record file cannot be written"

    def _claim(self, engine: Engine, now: float) -> bool:
        """A ban the engine starts itself takes its rate-cap slot from the lane's share, set
        anew first: a slot the minute let go of since the last read or tick is free."""
        if self.lane is None or self.reason is not None:
            return True
        self._allow(engine, now)
        return self.lane.claim()

    def _hold(self, source: IPAddress) -> None:
        if self.lane is not None and self._pinned:
            try:
                self.lane.pin(source)
            except LaneUnavailable as error:
                self._off_for_good(str(error))

    def _release(self, source: IPAddress) -> None:
        if self.lane is not None and self._pinned:
            self.lane.unpin(source)

    def _resync(self, engine: Engine) -> None:
        """The engine took the ban store's whole set again: the pins anew, with the lane off
        meanwhile. Cleared and still being refilled (a million bans take a while), the table let
        it act for a source the engine holds: a second line and KILL_ROUTE for a banned host."""
        if self.lane is None or not self._pinned:
            return
        self.lane.enable(False)
        self._repin(engine)
        self.lane.enable(self.reason is None)

    def _repin(self, engine: Engine) -> None:
        if self.lane is None:
            return
        self.lane.clear_pins()
        try:
            self.lane.pin_many(engine.held())  # repeats are pinned once
        except LaneUnavailable as error:
            self._off_for_good(str(error))
            return
        self._pinned = True

    def _off_for_good(self, why: str) -> None:
        """The lane cannot know every source the engine holds: it must not act again (this run)."""
        if self.lane is not None:
            self.lane.enable(False)
        self.broken = why
        if self.reason is None:
            self._log(f"adminalert: fast lane off: {why}")
        self.reason = why

    # -- tables -------------------------------------------------------------------------------

    def compile(self, sensors: Sequence[Sensor], config: Config, engine: Engine, journal: Journal,
                ignore: IgnoreSource, protected: Iterable[IPAddress], now: float) -> None:
        """The lane on, with current tables, or off and why (main loop: start, reload, tick).
        New sensors (a reload) bring a new lane, bound first."""
        current = next((s.lane for s in sensors if isinstance(s, StealthSensor) and s.lane is not None), None)
        if tuple(sensors) != self._bound[0] or current is not self.lane:
            self.bind(sensors, engine)
        lane, sensor = self.lane, self.sensor
        unavailable = next((s.lane_unavailable for s in sensors
                            if isinstance(s, StealthSensor) and s.lane_unavailable), None)
        reason = self.broken or why_off(config, engine, journal, sensor, unavailable)
        if reason is None and self._record < 0:
            reason = "its record file cannot be written"
        if reason is None and lane is not None and sensor is not None:
            reason = self._push(lane, sensor, config, engine, journal, ignore, protected, now)
        if reason is None and not self._pinned:
            self._repin(engine)  # before it may act: every source the engine holds
            reason = self.broken
        if lane is not None:
            lane.enable(reason is None)
            if reason is None:
                self._allow(engine, now)
            elif self._pinned:
                lane.clear_pins()  # off: the memory back; pinned again when it comes on
                self._pinned = False
        if reason != self.reason and self.reason != "not started" and lane is not None:
            self._log(f"adminalert: fast lane {'on' if reason is None else f'off: {reason}'}")
        self.reason = reason

    def _push(self, lane: Lane, sensor: StealthSensor, config: Config, engine: Engine, journal: Journal,
              ignore: IgnoreSource, protected: Iterable[IPAddress], now: float) -> str | None:
        assert isinstance(journal.syslog, SyslogWriter)
        route = engine.settings.kill_route
        # Built again only when the watches or the listening ports changed: with 65536 watched
        # ports the table costs 20 ms, and this runs every second.
        ports_from = (sensor.watches, sensor.listeners[Protocol.TCP].ports())
        if self._ports_from != ports_from:
            self._ports_from, self._ports = ports_from, port_table(sensor)
        tables = Tables(
            ports=self._ports, local=sensor.addresses.local,
            deny=deny_networks(config, ignore, now, protected, sensor), route=route,
            ignore=(ignore.path, ignore.file_key),
            syslog=(journal.syslog.path, f"<{LOG_DAEMON * 8 + LOG_NOTICE}>",
                    f" {journal.syslog.ident}[{os.getpid()}]: "))
        old = self._tables
        if old == tables:
            return None
        lane.enable(False)  # no packet decided on half-made tables
        if old is None or old.route != tables.route:
            lane.set_route(route)
            if route is not None and not _renders_alike(lane, route):
                self._tables = None
                return "KILL_ROUTE renders differently in C (a bug: said so the lane stays off)"
        if old is None or old.syslog != tables.syslog:
            lane.set_syslog(*tables.syslog)
        if old is None or old.ports != tables.ports:
            lane.set_ports(tables.ports)
        if old is None or old.local != tables.local:
            lane.set_local(tables.local)
        if old is None or old.deny != tables.deny:
            lane.set_deny(tables.deny)
        if old is None or old.ignore != tables.ignore:
            lane.set_ignore_file(*tables.ignore)
        self._tables = tables
        return None

    def _allow(self, engine: Engine, now: float) -> None:
        assert self.lane is not None
        free = engine.guard.free_bans(now)
        self.lane.allow(self.acted - self._before, NO_CAP if free is None else free)

    def handled(self, engine: Engine, now: float) -> None:
        """After the engine decided a read's hits: the rate cap's share, then the lane may act."""
        if self.lane is not None and self.sensor is not None:
            if self.reason is None:
                self._allow(engine, now)
            self.sensor.handled()

    # -- reports ------------------------------------------------------------------------------

    def started(self, act: Act) -> Started:
        """The lane's report as the block's Started (a ban taken in: counted). Without a shell
        (none could start) the ROUTE step starts its own."""
        self.acted += 1
        if act.pid < 0:
            return Started(line=act.line)
        return Started(act.pid, act.pipe, act.started, self._reaped(), act.line)

    def route_agrees(self, act: Act, block: Block) -> bool:
        """Whether the block's KILL_ROUTE is the command the lane ran (a reload may have changed
        it between the lane's act and this report)."""
        if act.pid < 0:
            return True
        route = next((step for step in block.steps if step.kind is StepKind.ROUTE), None)
        return route is not None and self._tables is not None and route.template == self._tables.route

    def disagreed_with(self, act: Act, why: str, submit: Submit) -> None:
        """The engine did not block what the lane began: said, and its shell seen through."""
        self.disagreed += 1
        self.acted += 1
        self.settled += 1
        self._log(f"adminalert: WARNING: the fast lane began a block of {act.source} that the daemon "
                  f"did not make ({why}); its tables were a moment behind")
        if act.pid >= 0:
            self._see_through(act.source, act.pid, act.pipe, act.started, self._reaped(), submit)
        self._free_line(act.line)

    def abandoned(self, block: Block, submit: Submit) -> None:
        """A block the lane began that no worker will carry out (the queue was full): said, as
        the engine's "Could not block" for it, and the lane's shell seen through."""
        started = block.started
        if started is not None and started.pid >= 0:
            self._see_through(block.probe.source, started.pid, started.pipe, started.at, started.reaped,
                              submit)

    def _reaped(self) -> Callable[[], None]:
        lane = self.lane

        def reaped() -> None:
            if lane is not None:
                lane.shell_done()

        return reaped

    def _see_through(self, source: IPAddress, pid: int, pipe: int, at: float, reaped: Callable[[], None],
                     submit: Submit) -> None:
        """Wait for a KILL_ROUTE the lane started that no block waits for; a route it made is
        said, since no ban holds it (an admin removes it, or `block` records it)."""
        log = self._log

        def wait() -> None:
            try:
                result = wait_shell("KILL_ROUTE", pid, pipe, at, SEE_THROUGH_TIMEOUT)
            finally:
                reaped()
            if result.ok:
                log(f"adminalert: WARNING: the fast lane's KILL_ROUTE for {source} ran, and no ban "
                    "records it")

        submit(wait)

    def block_done(self, line: int) -> None:
        """A block the lane began is over (its ban recorded or dropped again): its line of the
        record is freed. Written with pwrite on the keeper's own descriptor, so also after the
        lane that wrote it is gone (the stop, a reload)."""
        self.settled += 1
        self._free_line(line)

    def _free_line(self, line: int) -> None:
        if line < 0 or self._record < 0:
            return
        try:
            free_line(self._record, line)
        except OSError as error:
            # The line stays: the next start records its ban again if no ban holds it then.
            self._log(messages.config_error(f"cannot free a line of the fast lane's record "
                                            f"{self.path}: {error}"))

    def unbind(self) -> None:
        """Its capture is closing (the stop, a reload that rebinds): its reports are taken in
        and no lane acts until compile() binds the next one. The blocks it began end after it
        is freed, and free their lines then."""
        self.lane = None
        self.sensor = None
        self._bound = ((), None)
        self._pinned = False
        self._tables = None

    def close(self) -> None:
        if self._record >= 0:
            with contextlib.suppress(OSError):
                os.close(self._record)
            self._record = -1

    def describe(self) -> str:
        """For status; failures inside the lane and unreadable channel messages only when any."""
        text = (f"on ({self.acted} blocks begun, {self.disagreed} not taken up)" if self.reason is None
                else f"off: {self.reason}")
        lane, sensor = self.lane, self.sensor
        errors = lane.errors() if lane is not None else 0
        unreadable = sensor.lane_unreadable() if sensor is not None else 0
        if errors or unreadable:
            text += f"; {errors} lane errors, {unreadable} unreadable lane messages"
        return text


def _renders_alike(lane: Lane, template: str) -> bool:
    samples = ((ip_address("198.51.100.7"), 1, Mode.STCP), (ip_address("2001:db8::7"), 65535, Mode.ATCP))
    return all(lane.render(str(address), port, mode) == substitute(template, address, port, mode)
               for address, port, mode in samples)
