"""What watches the daemon without steering it: the JSON event log and the Prometheus metrics.

One object the daemon, the responders and the ban lifecycle report to, so none of them needs to
know whether an event log or a metrics endpoint is configured.
"""

from __future__ import annotations

from typing import Protocol

from portsentry.core.probe import IPAddress, Probe
from portsentry.journal import events
from portsentry.journal.events import EventLog
from portsentry.journal.failures import EVENT_LOG, WriteFailures


class MetricSink(Protocol):
    """What the daemon calls; both Metrics and NullMetrics provide it."""

    def probe(self, mode: str, kind: str) -> None: ...
    def decision(self, name: str) -> None: ...
    def ban(self, backend: str) -> None: ...
    def unban(self, reason: str) -> None: ...
    def set_active(self, backend: str, count: int) -> None: ...
    def set_state(self, table: str, count: int) -> None: ...
    def capture_drops(self, total: int) -> None: ...
    def packet_drops(self, totals: dict[str, int]) -> None: ...
    def record_failure(self, file: str) -> None: ...
    def action(self, step: str, seconds: float, ok: bool) -> None: ...
    def fleet_decisions(self, event: str, reason: str | None, count: int) -> None: ...
    def fleet_lag(self, seconds: float) -> None: ...
    def fleet_link(self, up: bool) -> None: ...


class NullMetrics:
    """Metrics off: every call does nothing."""

    def probe(self, mode: str, kind: str) -> None:
        pass

    def decision(self, name: str) -> None:
        pass

    def ban(self, backend: str) -> None:
        pass

    def unban(self, reason: str) -> None:
        pass

    def set_active(self, backend: str, count: int) -> None:
        pass

    def set_state(self, table: str, count: int) -> None:
        pass

    def capture_drops(self, total: int) -> None:
        pass

    def packet_drops(self, totals: dict[str, int]) -> None:
        pass

    def record_failure(self, file: str) -> None:
        pass

    def action(self, step: str, seconds: float, ok: bool) -> None:
        pass

    def fleet_decisions(self, event: str, reason: str | None, count: int) -> None:
        pass

    def fleet_lag(self, seconds: float) -> None:
        pass

    def fleet_link(self, up: bool) -> None:
        pass


class Telemetry:
    def __init__(self, event_log: EventLog | None = None, metrics: MetricSink | None = None,
                 failures: WriteFailures | None = None) -> None:
        self.event_log = event_log
        self.metrics: MetricSink = metrics if metrics is not None else NullMetrics()
        if failures is not None:
            # Failed record writes are counted in the metrics, and the event log's are reported.
            failures.count = self.metrics.record_failure
            if event_log is not None:
                event_log.reporter = lambda path, error: failures.failed(EVENT_LOG, path, error)

    def probe(self, probe: Probe, decision: str, reason: str | None, now: float,
              count: int | None = None) -> None:
        self.metrics.probe(probe.mode.value, probe.kind)
        self.metrics.decision(decision)
        if self.event_log is not None:
            self.event_log.write(events.probe_event(probe, decision, now, count=count, reason=reason))

    def ban(self, address: IPAddress, backend: str, duration: float | None, reason: str, now: float,
            count: int | None = None, new: bool = True) -> None:
        """`new` False: a ban in force given a later end, an event (docs/events.md: "or
        extended") but no ban made for portsentry_bans_total."""
        if new:
            self.metrics.ban(backend)
        if self.event_log is not None:
            self.event_log.write(events.ban_event(address, backend, duration, reason, now, count=count))

    def unban(self, address: IPAddress, reason: str, now: float) -> None:
        self.metrics.unban(reason)
        if self.event_log is not None:
            self.event_log.write(events.unban_event(address, reason, now))

    def action(self, address: IPAddress, step: str, seconds: float, error: str | None, now: float,
               probe: Probe | None = None) -> None:
        self.metrics.action(step, seconds, error is None)
        if error is not None and self.event_log is not None:
            self.event_log.write(events.action_failed_event(address, step, error, now, probe=probe))

    def state(self, sizes: dict[str, int], active_bans: dict[str, int], capture_drops: int | None,
              packet_drops: dict[str, int] | None = None) -> None:
        for table, count in sizes.items():
            self.metrics.set_state(table, count)
        for backend, count in active_bans.items():
            self.metrics.set_active(backend, count)
        if capture_drops is not None:
            self.metrics.capture_drops(capture_drops)
        if packet_drops:
            self.metrics.packet_drops(packet_drops)

    def reopen(self) -> None:
        if self.event_log is not None:
            self.event_log.reopen()

    def close(self) -> None:
        if self.event_log is not None:
            self.event_log.close()
