"""The daemon shell's own bookkeeping (its probe path is covered by the system tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from portsentry.service.daemon import MinuteCounts


def test_minute_counts_cover_the_last_hour_in_constant_space():
    counts = MinuteCounts()
    for second in range(0, 2 * 3600, 2):
        counts.add(float(second))
    # The current minute (empty at exactly 2 h) and the 59 before it: one event every two seconds.
    assert counts.total(2 * 3600.0) == 59 * 30
    assert len(counts._buckets) <= 61


def _daemon(tmp_path: Path, bans: Any = None, clock: Any = None, telemetry: Any = None) -> tuple[Any, Any]:
    import io

    from portsentry.config.ignore import IgnoreSource
    from portsentry.config.settings import Config
    from portsentry.core.probe import Mode
    from portsentry.journal.journal import Journal
    from portsentry.responders.classic import ClassicResponder
    from portsentry.responders.hostsdeny import HostsDeny
    from portsentry.service.daemon import Daemon

    said = io.StringIO()
    journal = Journal(None, stderr=said)
    config = Config(source="t", state_dir=str(tmp_path), protect_gateways=False, protect_resolvers=False)
    daemon = Daemon(config, [Mode.TCP], journal, IgnoreSource(None, lambda: []), [],
                    ClassicResponder(HostsDeny(str(tmp_path / "hosts.deny")), journal.log, 1.0),
                    bans=bans, clock=clock or (lambda: 1000.0), telemetry=telemetry)
    return daemon, said


def test_an_exception_in_maintenance_is_said_and_the_next_round_runs():
    # issue 10: one exception left _tick_running set, and no tick (expiry, guards) ever ran again.
    import time
    from ipaddress import ip_address

    from portsentry.service.maintenance import Findings, Maintenance

    class Broken:
        store = None
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
    daemon, said = _daemon(tmp_path)
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
    daemon, said = _daemon(tmp_path, telemetry=Telemetry(EventLog(str(events))))
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
