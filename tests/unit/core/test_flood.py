"""Repeat hits from blocked hosts: a bounded number of lines per window, and a summary."""

from __future__ import annotations

from ipaddress import ip_address

from portsentry.core.actions import Log
from portsentry.core.engine import Engine, EngineSettings
from portsentry.core.flood import RepeatLimiter
from portsentry.core.probe import KIND_SYN, Mode, Probe

A = ip_address("198.18.0.2")


def probe(port: int = 1, source=A, mode=Mode.STCP) -> Probe:
    return Probe(source=source, port=port, mode=mode, kind=KIND_SYN)


def test_limit_then_summary_when_the_window_closes():
    limiter = RepeatLimiter(limit=2, window=60)
    decisions = [limiter.allow(probe(port), 10.0 + port)[0] for port in range(5)]
    assert decisions == [True, True, False, False, False]
    assert limiter.flush(69.0) == []  # the window (opened at 10 s) is still open at 69 s
    [summary] = limiter.flush(70.5)
    assert summary == ("attackalert: Host: 198.18.0.2/198.18.0.2 is already blocked: 3 more TCP hits "
                       "in 60 seconds not logged (last to port 4)")
    assert len(limiter) == 0


def test_a_new_window_after_the_old_one_closes_reports_it_first():
    limiter = RepeatLimiter(limit=1, window=10)
    limiter.allow(probe(1), 0.0)
    limiter.allow(probe(2), 1.0)
    allowed, summaries = limiter.allow(probe(3), 12.0)
    assert allowed and len(summaries) == 1 and "1 more TCP hits" in summaries[0]


def test_full_table_closes_the_oldest_window_without_losing_its_count():
    limiter = RepeatLimiter(limit=1, window=60, capacity=2)
    limiter.allow(probe(source=ip_address("198.18.0.10")), 0.0)
    limiter.allow(probe(source=ip_address("198.18.0.10")), 0.1)  # suppressed
    limiter.allow(probe(source=ip_address("198.18.0.11")), 0.2)
    _allowed, summaries = limiter.allow(probe(source=ip_address("198.18.0.12")), 0.3)
    assert len(limiter) == 2
    assert summaries and "198.18.0.10" in summaries[0] and "1 more" in summaries[0]


def test_zero_limit_logs_every_hit_like_1_2():
    limiter = RepeatLimiter(limit=0, window=60)
    assert all(limiter.allow(probe(), float(n))[0] for n in range(100))


def test_engine_bounds_lines_from_a_blocked_host():
    engine = Engine(EngineSettings(block_tcp=0, log_repeat_limit=2, log_repeat_window=60), set())
    lines = []
    for port in range(1000):
        lines += [a.text for a in engine.observe(probe(port), 5.0).actions if isinstance(a, Log)]
    # First hit: detection + "Ignoring response"; two repeats: detection + already blocked each.
    assert len(lines) == 2 + 2 * 2
    summary = [a.text for a in engine.tick(100.0) if isinstance(a, Log)]
    assert summary and "997 more TCP hits" in summary[0]
    assert engine.state_sizes()["repeat_windows"] == 0


def test_default_logs_an_ordinary_scan_line_for_line():
    # issue 9.6: the old default of 5 cut an nmap -sF of 15 ports to 6 lines.
    limiter = RepeatLimiter(EngineSettings().log_repeat_limit, 60.0)
    assert all(limiter.allow(probe(port), 1.0)[0] for port in range(1, 1025))
    assert not limiter.allow(probe(1025), 1.0)[0]


def test_open_windows_are_summed_up_at_shutdown():
    engine = Engine(EngineSettings(block_tcp=1, kill_route="true $TARGET$", log_repeat_limit=2), set())
    engine.apply_ban_changes([(A, True)])
    for port in range(5):
        engine.observe(probe(port), 1.0)
    [summary] = engine.close()
    assert isinstance(summary, Log) and "3 more TCP hits in 60 seconds not logged" in summary.text
    assert engine.close() == []
