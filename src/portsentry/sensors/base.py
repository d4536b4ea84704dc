"""What every sensor gives the daemon: readable handles and, when one is ready, the hits it holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from portsentry.core.probe import Probe


@dataclass(frozen=True)
class Hit:
    """A probe plus the means to answer it (banner) while the connection is still open."""

    probe: Probe
    reply: Callable[[bytes], None] = lambda _data: None
    close: Callable[[], None] = lambda: None


class Readable(Protocol):
    def fileno(self) -> int: ...


def describe_sensor(sensor: object) -> list[str]:
    """What a sensor watches, for `portsentry status`."""
    describe = getattr(sensor, "describe", None)
    return list(describe()) if callable(describe) else []


class Sensor(Protocol):
    def open(self) -> list[Readable]:
        """Start watching; returns the handles to poll (empty: nothing could be watched)."""
        ...

    def read(self, handle: Readable) -> list[Hit]:
        """Drain a handle the poller found readable."""
        ...

    def close(self) -> None: ...
