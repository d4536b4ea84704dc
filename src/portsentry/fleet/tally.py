"""What the fleet threads count and say: the counters `portsentry status` shows, the metrics,
and the lines said once. Shared by fleet-publish, fleet-read and the main loop's `status`, so
every counter moves under one lock; the log and the metrics are called outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from portsentry.fleet.decision import Decision
from portsentry.fleet.link import describe_error
from portsentry.fleet.state import FleetCounters
from portsentry.journal.telemetry import Telemetry

Logger = Callable[[str], None]
# Refusals are said once per host and reason, for this many; then once that the rest are only
# counted: a key holder making up host ids would otherwise have one line each said.
MAX_SAID = 1000


class Tally:
    def __init__(self, log: Logger, telemetry: Telemetry, clock: Callable[[], float], redis: str) -> None:
        self.log, self.telemetry, self.clock, self.redis = log, telemetry, clock, redis
        self.counters = FleetCounters()
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._refusals_said: set[str] = set()  # at most MAX_SAID + 1

    def count(self, name: str, amount: int = 1) -> None:
        if amount <= 0:
            return
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + amount)
        self.telemetry.metrics.fleet_decisions(name, None, amount)

    def refused(self, reason: str, decision: Decision | None, detail: str = "") -> None:
        with self._lock:
            self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1
        self.telemetry.metrics.fleet_decisions("refused", reason, 1)
        who = decision.host if decision is not None else "?"
        what = f"{decision.kind} of {decision.address}" if decision is not None else "an entry"
        key = f"{reason}:{who}"
        with self._lock:
            said = len(self._refusals_said)
            if key in self._refusals_said or said > MAX_SAID:
                return
            self._refusals_said.add(key)
        self.log(f"fleet: refused {what} from {who}: {reason}" + (f" ({detail})" if detail else "")
                 + " (said once per host and reason)" if said < MAX_SAID else
                 f"fleet: refusals of more than {MAX_SAID} kinds (host and reason): the rest are counted "
                 "in 'portsentry status' and the metrics, not said")

    def lag(self, seconds: float) -> None:
        with self._lock:
            self.counters.lag = seconds
            self.counters.lag_max = max(self.counters.lag_max, seconds)
        self.telemetry.metrics.fleet_lag(seconds)

    def link(self, which: str, up: bool, error: BaseException | None = None) -> None:
        """One thread's connection (`which`: publish_up or read_up) came up or went down; the
        fleet's link is up when both are, and each change of it is said once."""
        with self._lock:
            c = self.counters
            was = c.publish_up and c.read_up
            setattr(c, which, up)
            if up:
                if c.publish_up and c.read_up:
                    c.error = c.down_since = None
            else:
                c.error = describe_error(error)
                if c.down_since is None:
                    c.down_since = self.clock()
            now_up = c.publish_up and c.read_up
        self.telemetry.metrics.fleet_link(now_up)
        if was != now_up:
            self.log(f"fleet: link to {self.redis} is up" if now_up else
                     f"fleet: link to {self.redis} is down ({describe_error(error)}); "
                     "detection and local bans go on, changes are sent when it is back")

    def say_once(self, key: str, text: str) -> None:
        with self._lock:
            if key in self._logged:
                return
            self._logged.add(key)
        self.log(text)

    def status(self) -> dict[str, object]:
        with self._lock:
            c = self.counters
            return {
                "link": "up" if c.publish_up and c.read_up else "down",
                "down_since": c.down_since, "error": c.error, "published": c.published,
                "received": c.received, "applied": c.applied, "refused": dict(c.refused),
                "lag_ms": None if c.lag is None else round(c.lag * 1000, 1),
                "lag_max_ms": round(c.lag_max * 1000, 1),
            }
