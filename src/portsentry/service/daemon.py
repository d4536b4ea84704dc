"""The daemon shell: feeds probes from the sensors to the engine and carries out its actions.

Threads, each with one job, and what each owns:
- main (the detection loop): the sensors, the selector, the engine and everything the engine
  decides; other threads never touch them, they post work to it (`_call_on_main`, woken through a
  socket pair) and it runs that work between packets. It also owns the fast lane's keeper
  (service.lane) and takes in the lane's reports (service.lane_path).
- lane (sensors/lane.c, C, no interpreter): reads the AF_PACKET capture when the fast lane is
  there; writes a lone stealth probe's detection line, its record and KILL_ROUTE's start, and hands every
  packet and report to main in order. It touches nothing of Python's.
- responder-N (blockqueue.BlockQueue): carry out blocks from a bounded queue, so a slow or
  hanging KILL_ROUTE never delays detection; outcomes are posted to main.
- maintenance (maintenance.Maintenance): expiry, records held back by a full disk, table repair,
  history pruning, gateways and resolvers, and the ban store's change feed; posts its Findings.
- admin-N: the ban work of control requests (list, block, unblock), apart from the blocks, so
  `portsentry list` answers while KILL_ROUTE commands hang.
- control (control.ControlServer): reads control requests and hands each to main or an admin
  worker (requests.Requests, which also says what status and stats report); never blocks.
- fleet-publish and fleet-read (fleet.node.FleetNode, with FLEET_REDIS_URL): bans shared with a
  fleet; main hands them the guards (ignore list, gateways, resolvers) once a second.

One object, Daemon, is the main loop and the one place that wires the threads above together,
so whatever touches the engine and the sensors has one owner. Its parts live beside it, each
saying which thread runs it: the start in service.startup, the reload and the sensors' re-binding
in service.reload, the signals and the stop in service.shutdown; the state they share is declared
in service.daemon_state. This module builds the Daemon and runs its loop and the probe path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from portsentry.bans.lifecycle import BanManager
from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config, engine_settings
from portsentry.core import messages
from portsentry.core.actions import Action, Block, Log, Record, SendBanner, Step
from portsentry.core.engine import Engine
from portsentry.core.probe import IPAddress, Mode, Probe, Protocol
from portsentry.fleet.node import FleetNode
from portsentry.journal.hits import HitTally
from portsentry.journal.journal import Journal
from portsentry.journal.telemetry import Telemetry
from portsentry.responders.classic import ClassicResponder
from portsentry.sensors.base import Hit, Sensor
from portsentry.service import sdnotify
from portsentry.service.admin import protected_addresses
from portsentry.service.blockqueue import BlockQueue
from portsentry.service.control import ControlServer
from portsentry.service.daemon_state import Clock, Reloader, SensorFactory
from portsentry.service.kernelbans import DroppedProbes, KernelBans, LateSteps
from portsentry.service.lane import LaneKeeper
from portsentry.service.lane_path import LanePath
from portsentry.service.maintenance import Findings, Maintenance, due
from portsentry.service.reload import Reloading
from portsentry.service.requests import Counters, Requests
from portsentry.service.resolver import Resolver
from portsentry.service.shutdown import Shutdown

AWAIT_CAPACITY = 64  # hits held per source while its name is looked up; more go on without it
# Hits held in all: a connect-mode hit holds its connection open, and 64 for each of the
# resolver's 256 lookups under way would be 16,384 descriptors while DNS does not answer.
AWAIT_TOTAL = 256


class Daemon(Reloading, Shutdown, LanePath):
    def __init__(
        self,
        config: Config,
        modes: Sequence[Mode],
        journal: Journal,
        ignore: IgnoreSource,
        sensors: Sequence[Sensor],
        responder: ClassicResponder,
        resolver: Resolver | None = None,
        clock: Clock = time.time,
        bans: BanManager | None = None,
        tick: float = 1.0,
        reloader: Reloader | None = None,
        sensor_factory: SensorFactory | None = None,
        control_path: str | None = None,
        telemetry: Telemetry | None = None,
        fleet: FleetNode | None = None,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.modes = tuple(modes)
        self.journal = journal
        self.ignore = ignore
        self.sensors = tuple(sensors)
        self.responder = responder
        self.resolver = resolver
        self.clock = clock
        self.bans = bans
        self.tick = tick
        self.telemetry = telemetry or Telemetry()
        self.reloader = reloader
        self.sensor_factory = sensor_factory
        self.started = clock()
        self.counters = Counters()
        self._reload_requested = False
        self._reopen_requested = False
        self._next_tick = 0.0
        self.active_bans = 0  # from the maintenance thread's Findings
        self.engine = Engine(engine_settings(config), ignore.current(clock()))
        self.lane = LaneKeeper(journal.log, config.state_dir)
        self._ignore_error: str | None = None
        # Hits held while their source's name is looked up (RESOLVE_HOST), per source, in order.
        self._awaiting_name: dict[IPAddress, list[tuple[Hit, float]]] = {}
        self._held = 0  # hits in _awaiting_name
        self.internal_errors = 0
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        # KILL_ROUTE re-runs after a reboot (bans.restore): told to start no more at the stop.
        self._reruns: threading.Thread | None = None
        self._stop_reruns = threading.Event()
        # The native sets were made to match the store at start (bans.restore): only then can a
        # clean stop vouch for them.
        self._restored = False
        self._blocks = BlockQueue(self._enforce, self._block_done, journal.log)
        self._admin = ThreadPoolExecutor(max_workers=2, thread_name_prefix="admin")
        # The steps of kernel bans recorded late (hosts.deny, KILL_ROUTE, KILL_RUN_CMD): not on the
        # maintenance thread that records them, nor on the admin workers `list` needs.
        self._late = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kernel-late")
        # The kernel's first-probe bans (stealth modes with nftables): guards pushed, bans settled.
        kernel = bans is not None and bans.backend is not None and config.kernel_ban != "off"
        self._kernel = self._kernel_bans(bans) if kernel and bans is not None else None
        # Probes of banned sources that only the kernel saw (NFLOG capture): summary lines.
        self._dropped = (DroppedProbes(bans, journal.log)
                         if bans is not None and bans.backend is not None else None)
        self._protected: frozenset[IPAddress] = frozenset()
        self.hits = HitTally()  # for `portsentry report`; written by the maintenance thread
        self._maintenance = Maintenance(bans, lambda: protected_addresses(self.config),
                                        lambda found: self._call_on_main(lambda: self._apply(found)),
                                        journal.log, interval=tick, clock=clock,
                                        settle=self._settle,
                                        tally=self.hits if bans is not None else None)
        # Work finished on a responder thread that the engine (main thread only) must hear about.
        self._main_calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self.requests = Requests(self, self._call_on_main, self._admin.submit, self._maintenance.wake)
        self.control = (ControlServer(control_path, self.requests.on_request, log=journal.log)
                        if control_path else None)

    def _kernel_bans(self, bans: BanManager) -> KernelBans:
        def steps(protocol: Protocol) -> tuple[Step, ...]:
            settings = self.engine.settings  # replaced whole by a reload, read once
            return settings.steps(settings.block_level(protocol))

        def recorded(probe: Probe, at: float) -> None:
            self._call_on_main(lambda: self._perform([Record(probe, at)], None, None))

        return KernelBans(bans, self.journal.log,
                          late=LateSteps(self.responder, steps, self._late.submit, recorded, self.clock))

    def _settle(self, now: float) -> None:
        """Maintenance thread: the kernel's side of the capture, its bans, then its counts."""
        if self._kernel is not None:
            self._kernel.settle(now)
        if self._dropped is not None:
            self._dropped.summarize(now)

    def _enforce(self, block: Block) -> bool | None:
        """On a responder thread: the ban lifecycle makes the ban (without a store, in tests that
        leave it out, the steps just run, for ever)."""
        if self.bans is None:
            return self.responder.carry_out(block, None)
        return self.bans.enforce(block, self.responder, counted=True)

    # -- the main loop -------------------------------------------------------------------------

    def run(self) -> None:
        # Hand the interpreter lock to a responder thread within 1 ms instead of Python's 5 ms
        # default, so a ban is not held up while the main thread drains a scan.
        sys.setswitchinterval(0.001)
        self.journal.log(messages.active())
        sdnotify.ready()
        sdnotify.status(f"watching: {' '.join(f'-{mode}' for mode in self.modes)}")
        try:
            while not self._stopping:
                for key, _events in self._selector.select(timeout=1.0):
                    if key.data is None:
                        self._drain_wake()
                    else:
                        sensor: Sensor = key.data
                        for hit in sensor.read(key.fileobj):  # type: ignore[arg-type]
                            self._guarded(self.handle, hit)
                        if sensor is self.lane.sensor:
                            self.lane.handled(self.engine, self.clock())
                self._run_main_calls()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                if self._reopen_requested:
                    self._reopen_requested = False
                    self.reopen_logs()
                self._maybe_tick()
        finally:
            # Whatever ends the loop, sensors close, bans under way finish and files are closed.
            self.shutdown()

    def _guarded(self, work: Callable[[Hit], None], hit: Hit) -> None:
        """A bug met by one probe is reported and detection goes on with the next."""
        try:
            work(hit)
        except Exception as error:
            self.internal_errors += 1
            self.journal.log(messages.config_error(f"internal error on a probe, skipped: {error!r}"))

    # -- the probe path ------------------------------------------------------------------------

    def _ignore_now(self, now: float) -> None:
        """The ignore list in force for the engine (an edit counts for the next packet), and a
        broken edit said once, at the next probe or the next tick, whichever comes first."""
        self.engine.ignore = self.ignore.current(now)
        if self.ignore.last_error != self._ignore_error:
            self._ignore_error = self.ignore.last_error
            if self._ignore_error:
                self.journal.log(messages.config_error(f"ignore list not reloaded: {self._ignore_error}"))

    def handle(self, hit: Hit) -> None:
        if hit.lane is not None:
            self._adopt(hit)
            return
        now = self.clock()
        self.counters.probe(now)
        self._ignore_now(now)
        probe = hit.probe
        if self.resolver is not None and probe.source not in self.engine.ignore:
            # RESOLVE_HOST: never wait for DNS here. A source whose name is being looked up has
            # its hits held, in order, until the name (or the resolver's timeout) comes back.
            waiting = self._awaiting_name.get(probe.source)
            room = self._held < AWAIT_TOTAL
            if waiting is not None and len(waiting) < AWAIT_CAPACITY and room:
                waiting.append((hit, now))
                self._held += 1
                return
            if waiting is None:
                source = probe.source
                if room:
                    name = self.resolver.lookup(
                        source, lambda found: self._call_on_main(lambda: self._named(source, found)))
                    if name is None:
                        self._awaiting_name[source] = [(hit, now)]
                        self._held += 1
                        return
                else:  # nothing more can be held: a name already known is used, none awaited
                    name = self.resolver.cached(source)
                if name is not None:
                    probe = dataclasses.replace(probe, source_name=name)
        self._observe(hit, probe, now)

    def _named(self, source: IPAddress, name: str) -> None:
        """On the main loop: the held hits of `source`, decided now with its name."""
        hits = self._awaiting_name.pop(source, [])
        self._held -= len(hits)
        for hit, at in hits:
            def observe(held: Hit, at: float = at) -> None:
                self._observe(held, dataclasses.replace(held.probe, source_name=name), at)
            self._guarded(observe, hit)

    def _observe(self, hit: Hit, probe: Probe, now: float) -> None:
        try:
            outcome = self.engine.observe(probe, now)
            fields: dict[str, object] = {
                "PORTSENTRY_EVENT": outcome.decision.value, "PORTSENTRY_SRC": probe.source,
                "PORTSENTRY_PORT": probe.port, "PORTSENTRY_MODE": probe.mode.value,
                "PORTSENTRY_KIND": probe.kind,
            }
            # The line and the block first: the event log and the report tally can wait the
            # few tens of microseconds a lone probe costs (docs/performance.md, classic path).
            self.perform(outcome.actions, hit, fields)
            self.telemetry.probe(probe, outcome.decision, outcome.reason, now, outcome.count)
            self.hits.add(probe, outcome.decision, outcome.reason, now)
        finally:
            hit.close()

    def perform(self, actions: list[Action], hit: Hit | None = None,
                fields: dict[str, object] | None = None, sent: str | None = None) -> None:
        """`sent`: a line the fast lane has written to syslog already (its detection line)."""
        if not any(isinstance(action, Block) for action in actions):
            self._perform(actions, hit, fields, sent)
            return
        # A block goes to its worker first, which starts on the ban record and the command while
        # this thread writes the detection line; the journal is held meanwhile, so every line the
        # worker logs still comes after it. With the queue full, the block is offered (and the
        # refusal said) only after the line, as before. Only this thread fills the queue.
        late: list[Block] = []
        with self.journal.in_order():
            for action in actions:
                if isinstance(action, Block) and (self._blocks.full or not self._blocks.submit(action)):
                    late.append(action)
            self._perform([action for action in actions if not isinstance(action, Block)], hit, fields, sent)
        for block in late:
            if not self._blocks.submit(block):
                # Not started: the engine forgets it, so the host's next hit tries again.
                self._lane_block_over(block, abandoned=True)
                self.perform(self.engine.finished(block, False, self.clock()))

    def _perform(self, actions: list[Action], hit: Hit | None, fields: dict[str, object] | None,
                 sent: str | None = None) -> None:
        for action in actions:
            if isinstance(action, Log):
                already = sent is not None and action.text == sent
                if already:
                    sent = None  # once: a second line of the same text is a line of its own
                self.journal.log(action.text, verbose=action.verbose, fields=fields, sent=already)
            elif isinstance(action, SendBanner):
                if hit is not None:
                    hit.reply(action.text.encode("utf-8", "replace"))
            elif isinstance(action, Record):
                self.journal.record(action.probe, action.at)
                if action.blocked:
                    self.counters.block(action.at)

    def _block_done(self, block: Block, succeeded: bool | None, error: BaseException | None) -> None:
        """On a responder thread: hand the outcome to the main loop."""
        if error is not None:
            self.journal.log(messages.config_error(f"responder failed: {error!r}"))
        def finished() -> None:
            self._lane_block_over(block)
            self.perform(self.engine.finished(block, succeeded, self.clock()))

        self._call_on_main(finished)
        self._maintenance.wake()  # the ban's change reaches status and the gauges at once

    def _call_on_main(self, call: Callable[[], None]) -> None:
        self._main_calls.put(call)
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def _run_main_calls(self) -> None:
        while True:
            try:
                call = self._main_calls.get_nowait()
            except queue.Empty:
                return
            try:
                call()
            except Exception as error:  # one failed piece of work must not stop the others
                self.internal_errors += 1
                self.journal.log(messages.config_error(f"internal error, skipped: {error!r}"))

    def _maybe_tick(self) -> None:
        """Once a second on the main loop: what only the engine can do (summary lines of repeat
        windows and rate-limit minutes that ended), failed-write summaries, and the gauges.
        Everything slow is the maintenance thread's."""
        now = self.clock()
        if not due(now, self._next_tick, self.tick):  # also after the clock was set back
            return
        self._next_tick = now + self.tick
        # A quiet host hears of a broken ignore-file edit within a second, not at the next scan.
        self._ignore_now(now)
        for sensor in self.sensors:
            sensor.tick(now)
        self._lane_compile()
        self.perform(self.engine.tick(now))
        self.journal.flush()
        self.journal.failures.flush()
        bans = self.bans
        backend = bans.backend.name if bans is not None and bans.backend is not None else "none"
        self.telemetry.state(self.engine.state_sizes(), {backend: self.active_bans},
                             self.capture_drops(), self.packet_drops())

    def _apply(self, found: Findings) -> None:
        """On the main loop: what the maintenance thread found."""
        if found.resync is not None:
            self.engine.sync_bans(address.packed for address in found.resync)
        self.engine.apply_ban_changes(found.changes)
        if found.protected is not None:
            self.engine.guard.set_protected(found.protected)
            self._protected = found.protected
        if self._kernel is not None and self._kernel.update(self._kernel_guards()):
            self._admin.submit(self._push_guards)
        self._skip_ignored()
        if found.active is not None:
            self.active_bans = found.active
        if self.fleet is not None:
            self.fleet.set_guards(self._fleet_guards())

    def _push_guards(self) -> None:
        """On an admin worker: whose Future nobody looks at, so a failure is said here."""
        try:
            if self._kernel is not None:
                self._kernel.push()
        except Exception as error:
            self.journal.log(messages.config_error(f"internal error updating the kernel's guards: {error!r}"))

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_read.recv(4096):
                pass
