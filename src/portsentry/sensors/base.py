"""What every sensor gives the daemon: readable handles and, when one is ready, the hits it holds."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from portsentry.core.probe import Probe
from portsentry.sensors.lane import Act


@dataclass(frozen=True)
class Hit:
    """A probe plus the means to answer it (banner) while the connection is still open."""

    probe: Probe
    reply: Callable[[bytes], None] = lambda _data: None
    close: Callable[[], None] = lambda: None
    lane: Act | None = None  # what the fast lane already did for it (sensors.lane)


class Readable(Protocol):
    def fileno(self) -> int: ...


class Sensor(Protocol):
    """Every sensor says all of this; what a kind of sensor lacks (a connect sensor has no
    capture buffer to overflow, no packets to drop) it answers with None or nothing."""

    def open(self) -> list[Readable]:
        """Start watching; returns the handles to poll (empty: nothing could be watched)."""
        ...

    def read(self, handle: Readable) -> list[Hit]:
        """Drain a handle the poller found readable."""
        ...

    def close(self) -> None: ...

    def handled(self) -> None:
        """The daemon has decided every hit of the last read (the fast lane may act again)."""
        ...

    def describe(self) -> list[str]:
        """What it watches, for `portsentry status`."""
        ...

    def tick(self, now: float) -> None:
        """Once a second on the main loop, with or without traffic: keep derived state current
        (the stealth sensor's live ports, which the kernel's first-probe ban depends on)."""
        ...

    def capture_drops(self) -> int | None:
        """Packets the kernel dropped before we could read them; None when it cannot know."""
        ...

    def packet_drops(self) -> dict[str, int]:
        """Packets read but dropped before the engine (malformed, forged), per reason."""
        ...

    def skip_sources(self, networks: Collection[IPv4Network | IPv6Network]) -> None:
        """Sources whose packets need not reach the daemon at all (the ignore list, when
        nothing of them is logged): a packet capture rejects them in the kernel."""
        ...
