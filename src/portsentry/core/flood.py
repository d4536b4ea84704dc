"""Log-flood control for hosts that are already blocked.

A route block is asymmetric and a stealth sensor sees packets before the firewall drops them, so a
blocked scanner keeps producing hits; 1.2 wrote two lines per packet forever (a 65,535-port scan
is 131,070 lines). Here each (mode, host) may log `limit` hits per `window` seconds; the rest are
counted and one summary line says how many were left out, when the window ends (the daemon's
tick) or at shutdown, whether or not the host is heard from again.

The default is DEFAULT_LIMIT hits a minute (two lines each): an ordinary scan is evidence and is
logged line for line as 1.2 logs it (every port of -atcp's default 1024-port range, every one of
-tcp's bait ports, an nmap top-1000 scan), and only a flood beyond that, a full 65,535-port scan or
a packet storm from a blocked host, is summed up. 5, the old default, cut an `nmap -sF` of 15
ports to 6 lines, also in observe mode where nothing was blocked. The table is bounded: when it is full
the oldest window is closed early (its summary is still written), so no count is ever lost.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from portsentry.core import messages
from portsentry.core.probe import IPAddress, Mode, Probe

Key = tuple[Mode, IPAddress]
DEFAULT_LIMIT = 1024
DEFAULT_WINDOW = 60.0


@dataclass
class _Window:
    start: float
    logged: int
    suppressed: int
    probe: Probe


class RepeatLimiter:
    def __init__(self, limit: int, window: float, capacity: int = 4096) -> None:
        self.limit = limit  # 0 = no limit (1.2's behaviour)
        self.window = window
        self.capacity = capacity
        self._windows: OrderedDict[Key, _Window] = OrderedDict()
        self.suppressed_total = 0

    def __len__(self) -> int:
        return len(self._windows)

    def allow(self, probe: Probe, now: float) -> tuple[bool, list[str]]:
        """Whether to log this repeat hit, and summary lines of windows that closed."""
        if self.limit <= 0:
            return True, []
        key = (probe.mode, probe.source)
        summaries: list[str] = []
        current = self._windows.get(key)
        if current is not None and not 0 <= now - current.start < self.window:
            summaries += self._close(key)
            current = None
        if current is None:
            while len(self._windows) >= self.capacity:
                summaries += self._close(next(iter(self._windows)))
            current = self._windows[key] = _Window(now, 0, 0, probe)
        current.probe = probe
        if current.logged < self.limit:
            current.logged += 1
            return True, summaries
        current.suppressed += 1
        self.suppressed_total += 1
        return False, summaries

    def flush_all(self) -> list[str]:
        """At shutdown: the summaries of every open window."""
        return [line for key in list(self._windows) for line in self._close(key)]

    def flush(self, now: float) -> list[str]:
        """Summaries of every window that has ended by `now` (called once a second)."""
        ended = [key for key, w in self._windows.items() if not 0 <= now - w.start < self.window]
        return [line for key in ended for line in self._close(key)]

    def _close(self, key: Key) -> list[str]:
        window = self._windows.pop(key)
        if not window.suppressed:
            return []
        return [messages.repeats_suppressed(window.probe, window.suppressed, self.window)]
