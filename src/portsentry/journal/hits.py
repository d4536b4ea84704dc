"""Hit aggregates for `portsentry report`: what each source did, per port, mode, scan type and
hour, and what the guards refused, per hour and reason.

Threads: the main loop calls `add` for every probe the engine decided on (a dict update, no
I/O; with RESOLVE_HOST it also keeps the source's name); the maintenance thread calls `drain`
and `drain_names` once a second and writes the rows to the ban store in
one transaction. The table in memory is bounded: past `capacity` keys a new key is counted in
`overflow` and dropped, never blocking detection.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from portsentry.core.actions import Decision
from portsentry.core.probe import IPAddress, Probe

CAPACITY = 100_000


@dataclass(frozen=True, slots=True)
class HitRow:
    source: str
    port: int
    mode: str
    hour: int
    kind: str
    count: int
    below: int  # of `count`, hits below SCAN_TRIGGER
    first: float
    last: float


class HitTally:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.overflow = 0
        self._lock = threading.Lock()
        # (source, port, mode, hour, kind) -> [count, below, first, last]
        self._hits: dict[tuple[IPAddress, int, str, int, str], list[float]] = {}
        self._refused: dict[tuple[int, str], int] = {}
        self._names: dict[IPAddress, tuple[str, float]] = {}  # RESOLVE_HOST's names, latest each

    def add(self, probe: Probe, decision: Decision, reason: str | None, now: float) -> None:
        if decision is Decision.IGNORED:
            return
        hour = int(now // 3600)
        name = probe.source_name
        with self._lock:
            if name and name != str(probe.source) and (
                    probe.source in self._names or len(self._names) < self.capacity):
                self._names[probe.source] = (name, now)
            if decision is Decision.REFUSED:
                key = (hour, reason or "refused")
                self._refused[key] = self._refused.get(key, 0) + 1
            entry_key = (probe.source, probe.port, probe.mode.value, hour, probe.kind)
            entry = self._hits.get(entry_key)
            if entry is None:
                if len(self._hits) >= self.capacity:
                    self.overflow += 1
                    return
                self._hits[entry_key] = [1, int(decision is Decision.BELOW_TRIGGER), now, now]
                return
            entry[0] += 1
            entry[1] += decision is Decision.BELOW_TRIGGER
            entry[3] = now

    def drain(self) -> tuple[list[HitRow], list[tuple[int, str, int]]]:
        """What was tallied since the last drain; the tally starts afresh."""
        with self._lock:
            hits, self._hits = self._hits, {}
            refused, self._refused = self._refused, {}
        rows = [HitRow(str(source), port, mode, hour, kind, int(v[0]), int(v[1]), v[2], v[3])
                for (source, port, mode, hour, kind), v in hits.items()]
        return rows, [(hour, reason, count) for (hour, reason), count in refused.items()]

    def drain_names(self) -> list[tuple[str, str, float]]:
        """(address, name, when) of the names resolved since the last drain."""
        with self._lock:
            names, self._names = self._names, {}
        return [(str(address), name, at) for address, (name, at) in names.items()]

    def restore_names(self, names: list[tuple[str, str, float]]) -> None:
        """Put back names that could not be written; a newer name of the same address wins."""
        with self._lock:
            for address_text, name, at in names:
                address = _address(address_text)
                if address not in self._names:
                    self._names[address] = (name, at)

    def restore(self, rows: list[HitRow], refused: list[tuple[int, str, int]]) -> None:
        """Put back what could not be written (a full disk): it is merged with what came since."""
        with self._lock:
            for row in rows:
                key = (_address(row.source), row.port, row.mode, row.hour, row.kind)
                entry = self._hits.get(key)
                if entry is None:
                    self._hits[key] = [row.count, row.below, row.first, row.last]
                else:
                    entry[0] += row.count
                    entry[1] += row.below
                    entry[2] = min(entry[2], row.first)
            for hour, reason, count in refused:
                self._refused[(hour, reason)] = self._refused.get((hour, reason), 0) + count


def _address(text: str) -> IPAddress:
    from ipaddress import ip_address

    return ip_address(text)
