"""What each stealth mode watches: a Watch (a port list, or every port below a limit less
exclusions) and the port -> modes table the stealth sensor indexes on its packet path; built at
open(), in the daemon's main thread."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from portsentry.core.probe import Mode


@dataclass(frozen=True)
class Watch:
    """The ports one stealth mode reports: an explicit list, or every port below a limit."""

    mode: Mode
    ports: frozenset[int] = frozenset()
    below: int | None = None
    exclude: frozenset[int] = frozenset()

    def covers(self, port: int) -> bool:
        if self.below is not None:
            return port < self.below and port not in self.exclude
        return port in self.ports

    def upper_bound(self) -> int:
        return self.below if self.below is not None else max(self.ports, default=-1) + 1


def modes_by_port(watches: Sequence[Watch]) -> list[tuple[Mode, ...]]:
    """For each port below the highest watched, the modes watching it (one shared tuple per
    combination, so 65536 ports cost a list of references)."""
    shared: dict[tuple[Mode, ...], tuple[Mode, ...]] = {}
    table = []
    for port in range(min(max((w.upper_bound() for w in watches), default=0), 0x10000)):
        modes = tuple(w.mode for w in watches if w.covers(port))
        table.append(shared.setdefault(modes, modes))
    return table
