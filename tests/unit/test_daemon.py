"""The daemon shell's own bookkeeping (its probe path is covered by the system tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from portsentry.daemon import MinuteCounts


def test_minute_counts_cover_the_last_hour_in_constant_space():
    counts = MinuteCounts()
    for second in range(0, 2 * 3600, 2):
        counts.add(float(second))
    # The current minute (empty at exactly 2 h) and the 59 before it: one event every two seconds.
    assert counts.total(2 * 3600.0) == 59 * 30
    assert len(counts._buckets) <= 61


def _daemon(tmp_path: Path, bans: Any = None, clock: Any = None) -> tuple[Any, Any]:
    import io

    from portsentry.config import Config
    from portsentry.daemon import Daemon
    from portsentry.ignore import IgnoreSource
    from portsentry.journal.journal import Journal
    from portsentry.probe import Mode
    from portsentry.responders.classic import ClassicResponder
    from portsentry.responders.hostsdeny import HostsDeny

    said = io.StringIO()
    journal = Journal(None, stderr=said)
    config = Config(source="t", state_dir=str(tmp_path), protect_gateways=False, protect_resolvers=False)
    daemon = Daemon(config, [Mode.TCP], journal, IgnoreSource(None, lambda: []), [],
                    ClassicResponder(HostsDeny(str(tmp_path / "hosts.deny")), journal.log, 1.0),
                    bans=bans, clock=clock or (lambda: 1000.0))
    return daemon, said


def test_an_exception_in_the_tick_is_said_and_the_next_tick_runs(tmp_path):
    # issue 10: one exception left _tick_running set, and no tick (expiry, guards) ever ran again.
    import time

    class Broken:
        store = None
        backend = None

        def repair(self, now):
            raise RuntimeError("repair broke")

    now = [1000.0]
    daemon, said = _daemon(tmp_path, bans=Broken(), clock=lambda: now[0])
    daemon._next_repair = 0.0
    for _ in range(2):
        daemon._maybe_tick()
        deadline = time.monotonic() + 5
        while daemon._tick_running and time.monotonic() < deadline:
            daemon._run_main_calls()
            time.sleep(0.01)
        assert not daemon._tick_running
        now[0] += 61
    assert said.getvalue().count("internal error in the maintenance tick: RuntimeError('repair broke')") == 2
    daemon.shutdown()


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
