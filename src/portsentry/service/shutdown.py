"""Stopping the daemon: the signals it answers, the stop request, and the shutdown sequence.

The handlers (`install_signal_handlers`) run on the main thread, as Python runs every signal
handler, and only set a flag and wake the loop: SIGTERM and SIGINT ask for the stop
(`request_stop`), SIGHUP for a reload, SIGUSR1 for the logs to be reopened. `shutdown` runs on
the main thread once its loop has ended, whatever ended it, or when the start watched nothing
(cli.run): the sensors close, the other threads stop in an order that loses no line and
half-records no ban, and all of it within one COMMAND_TIMEOUT (plus a few seconds). Part of
Daemon (service.daemon).
"""

from __future__ import annotations

import contextlib
import signal
import time
from types import FrameType

from portsentry.bans.restore import remember_stop
from portsentry.service import sdnotify
from portsentry.service.startup import Startup


class Shutdown(Startup):
    """The Daemon's signals and its stop."""

    def request_stop(self, *_args: object) -> None:
        self._stopping = True
        sdnotify.stopping()
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")

    def install_signal_handlers(self) -> None:
        def on_signal(_signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        def on_hangup(_signum: int, _frame: FrameType | None) -> None:
            self._reload_requested = True
            with contextlib.suppress(OSError):
                self._wake_write.send(b"\0")

        def on_reopen(_signum: int, _frame: FrameType | None) -> None:
            self._reopen_requested = True
            with contextlib.suppress(OSError):
                self._wake_write.send(b"\0")

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hangup)
        # logrotate's postrotate: files only, so a rotation never applies a half-edited config.
        signal.signal(signal.SIGUSR1, on_reopen)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def shutdown(self) -> None:
        # Commands of blocks still to run get the time left of one COMMAND_TIMEOUT from now: the
        # stop then ends within it (plus a few seconds), inside systemd's TimeoutStopSec=45s
        # with the default 30 s, so no SIGKILL loses the last lines or leaves a command behind.
        self.responder.stop_by(time.monotonic() + self.responder.timeout)
        self._stop_reruns.set()
        self._stop_lane()
        for sensor in self.sensors:
            sensor.close()
        for source in list(self._awaiting_name):  # no time left to wait for names
            self._named(source, str(source))
        self.perform(self.engine.close())
        if self.control is not None:
            self.control.close()
        if self.fleet is not None:
            self.fleet.stop()
        self._maintenance.stop()
        if self._dropped is not None:
            self._dropped.summarize(self.clock(), force=True)  # the last round's counts, not lost
        # Blocks already under way finish (each bounded by COMMAND_TIMEOUT) so none is half-recorded;
        # queued ones start only within blockqueue.STOP_GRACE, so the stop stays bounded.
        self._blocks.close()
        # Late kernel bans' steps under way finish (their commands have the stop's deadline);
        # the maintenance thread that hands them over has stopped.
        self._late.shutdown(wait=True)
        if self._reruns is not None:  # only the re-runs under way, each bounded by COMMAND_TIMEOUT
            self._reruns.join()
        # Before the admin workers go: the last round's Findings may hand them the kernel's
        # guards, which hold while the daemon is away. Nothing they run posts work back here.
        self._run_main_calls()
        self.lane.close()  # after the blocks the lane began are over: they empty its record
        self._admin.shutdown(wait=True)
        if self.bans is not None and self._restored:  # nothing bans or lifts any more
            remember_stop(self.bans, self._stop_path())
        if self.resolver is not None:
            self.resolver.close()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()
