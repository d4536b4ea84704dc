"""The daemon shell: feeds probes from the sensors to the engine and carries out its actions.

One thread polls every sensor; blocking steps run on worker threads and report back through a
wake-up socket, so a slow KILL_ROUTE never delays detection of the next probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType

from . import messages
from .actions import Action, Block, Log, Record, SendBanner
from .bans import BanManager
from .config import Config
from .engine import Engine, EngineSettings
from .ignore import IgnoreSource
from .journal.journal import Journal
from .probe import Mode
from .resolver import Resolver
from .responders.classic import ClassicResponder
from .sensors.base import Hit, Sensor

Clock = Callable[[], float]


class Daemon:
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
    ) -> None:
        self.config = config
        self.modes = tuple(modes)
        self.journal = journal
        self.ignore = ignore
        self.sensors = tuple(sensors)
        self.responder = responder
        self.resolver = resolver
        self.clock = clock
        self.bans = bans
        self.tick = tick
        self._next_tick = 0.0
        self._tick_running = False
        self.engine = Engine(EngineSettings.from_config(config), ignore.current(clock()))
        self._ignore_error: str | None = None
        self.probes_seen = 0
        self._selector = selectors.DefaultSelector()
        self._stopping = False
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="responder")
        # Work finished on a responder thread that the engine (main thread only) must hear about.
        self._main_calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)

    # -- start and stop ------------------------------------------------------------------------

    def open(self) -> bool:
        """Start every sensor; False when none could watch anything (1.2 then shuts down)."""
        any_open = False
        for sensor in self.sensors:
            for handle in sensor.open():
                self._selector.register(handle, selectors.EVENT_READ, sensor)
                any_open = True
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self.journal.start_session(list(self.modes))
        if self.bans is not None:
            active = self.bans.restore(self.clock())
            self.engine.sync_bans({ban.address for ban in active})
        return any_open

    def request_stop(self, *_args: object) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def install_signal_handlers(self) -> None:
        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # 1.2 ignored these; reload on SIGHUP is planned (operations issue).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def run(self) -> None:
        self.journal.log(messages.active())
        while not self._stopping:
            for key, _events in self._selector.select(timeout=1.0):
                if key.data is None:
                    self._drain_wake()
                else:
                    sensor: Sensor = key.data
                    for hit in sensor.read(key.fileobj):  # type: ignore[arg-type]
                        self.handle(hit)
            self._run_main_calls()
            self._maybe_tick()
        self.shutdown()

    def shutdown(self) -> None:
        for sensor in self.sensors:
            sensor.close()
        # Blocks already under way finish (each bounded by COMMAND_TIMEOUT) so none is half-recorded.
        self._workers.shutdown(wait=True)
        self._run_main_calls()
        if self.resolver is not None:
            self.resolver.close()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    # -- the probe path ------------------------------------------------------------------------

    def handle(self, hit: Hit) -> None:
        now = self.clock()
        self.probes_seen += 1
        self.engine.ignore = self.ignore.current(now)
        if self.ignore.last_error != self._ignore_error:
            self._ignore_error = self.ignore.last_error
            if self._ignore_error:
                self.journal.log(messages.config_error(f"ignore list not reloaded: {self._ignore_error}"))
        probe = hit.probe
        if self.resolver is not None and probe.source not in self.engine.ignore:
            probe = dataclasses.replace(probe, source_name=self.resolver.name(probe.source))
        try:
            self.perform(self.engine.observe(probe, now), hit)
        finally:
            hit.close()

    def perform(self, actions: list[Action], hit: Hit | None = None) -> None:
        for action in actions:
            if isinstance(action, Log):
                self.journal.log(action.text, verbose=action.verbose)
            elif isinstance(action, SendBanner):
                if hit is not None:
                    hit.reply(action.text.encode("utf-8", "replace"))
            elif isinstance(action, Record):
                self.journal.record(action.probe, action.at)
            elif isinstance(action, Block):
                self._submit(action)

    def _submit(self, block: Block) -> None:
        future = self._workers.submit(self.responder.carry_out, block)

        def done(future: Future[bool], block: Block = block) -> None:
            try:
                succeeded = future.result()
            except Exception as error:  # a responder bug must not lose the outcome
                self.journal.log(messages.config_error(f"responder failed: {error!r}"))
                succeeded = False
            self._call_on_main(
                lambda: self.perform(self.engine.finished(block, succeeded, self.clock())))

        future.add_done_callback(done)

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
            call()

    def _maybe_tick(self) -> None:
        """Once a second: lift expired bans and catch up with `block`/`unblock` from the CLI."""
        now = self.clock()
        if self.bans is None or self._tick_running or now < self._next_tick:
            return
        self._next_tick = now + self.tick
        self._tick_running = True
        bans = self.bans

        def tick() -> None:
            try:
                bans.expire(now)
                active = {ban.address for ban in bans.store.active(now)}
            except Exception as error:  # the store may be unreadable for a while (disk full)
                self.journal.log(messages.store_failed(repr(error)))
                active = None

            def apply() -> None:
                self._tick_running = False
                if active is not None:
                    self.engine.sync_bans(active)

            self._call_on_main(apply)

        self._workers.submit(tick)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_read.recv(4096):
                pass
