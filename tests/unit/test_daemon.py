"""The daemon shell's own bookkeeping (its probe path is covered by the system tests)."""

from __future__ import annotations

from portsentry.daemon import MinuteCounts


def test_minute_counts_cover_the_last_hour_in_constant_space():
    counts = MinuteCounts()
    for second in range(0, 2 * 3600, 2):
        counts.add(float(second))
    # The current minute (empty at exactly 2 h) and the 59 before it: one event every two seconds.
    assert counts.total(2 * 3600.0) == 59 * 30
    assert len(counts._buckets) <= 61
