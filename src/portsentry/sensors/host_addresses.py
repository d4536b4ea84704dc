"""This host's own and broadcast addresses and its bridge and bond ports, as the stealth sensor
needs them to tell probes from its own traffic; refreshed from the daemon's main thread (the
stealth sensor's open() and tick())."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from portsentry.core.probe import IPAddress

AddressQuery = Callable[[], Iterable[IPAddress]]
InterfaceQuery = Callable[[], Iterable[int]]

# Seconds between reads of the bridge and bond ports: a link dump costs milliseconds on a host
# with hundreds of interfaces (VM taps), and ports rarely change.
RELAYING_INTERVAL = 10.0


class HostAddresses:
    """This host's own and broadcast addresses, re-read at most once a second, and the
    interfaces enslaved to a bridge or bond (host.info.relaying_ports), every RELAYING_INTERVAL."""

    def __init__(self, local: AddressQuery, broadcast: AddressQuery, min_interval: float = 1.0,
                 relaying: InterfaceQuery = lambda: ()) -> None:
        self._query_local = local
        self._query_broadcast = broadcast
        self._query_relaying = relaying
        self.min_interval = min_interval
        self.local: frozenset[IPAddress] = frozenset()
        self.broadcast: frozenset[IPAddress] = frozenset()
        self.relaying: frozenset[int] = frozenset()
        self._checked_at: float | None = None
        self._relaying_at: float | None = None

    def refresh(self, now: float) -> None:
        if self._checked_at is not None and 0 <= now - self._checked_at < self.min_interval:
            return
        self._checked_at = now
        try:
            self.local = frozenset(self._query_local())
            self.broadcast = frozenset(self._query_broadcast())
            last = self._relaying_at
            if last is None or not 0 <= now - last < RELAYING_INTERVAL:
                self._relaying_at = now
                self.relaying = frozenset(self._query_relaying())
        except OSError:
            pass  # keep the previous sets; the next refresh tries again
