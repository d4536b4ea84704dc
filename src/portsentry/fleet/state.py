"""What a host keeps of the fleet between runs, in STATE_DIR/fleet.json: its epoch, the last change
of its own feed it published, the last stream entry it read, and the newest (epoch, seq) taken from
each peer. Written whole and renamed into place; a file that cannot be read or makes no sense is
set aside with a word in the log, and the host starts afresh (it then loads the fleet's active
set, so nothing is lost, and what comes twice is harmless).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field

_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}", re.ASCII)


@dataclass
class FleetState:
    epoch: int | None = None
    published: int | None = None
    stream: bytes | None = None
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)


def _whole(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def load_state(path: str, fleet: str) -> tuple[FleetState, str | None]:
    """The state saved for `fleet`, and why it was not usable (None: fine, or none saved yet)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return FleetState(), None
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested past json's reach
        return FleetState(), f"cannot read {path} ({error}); starting afresh"
    if not isinstance(data, dict) or data.get("fleet") != fleet:
        return FleetState(), None  # another fleet's cursors mean nothing here
    stream = data.get("stream")
    seen: dict[str, tuple[int, int]] = {}
    raw_seen = data.get("seen")
    for host, order in (raw_seen.items() if isinstance(raw_seen, dict) else ()):
        if (isinstance(host, str) and isinstance(order, list) and len(order) == 2
                and (epoch := _whole(order[0])) is not None and (seq := _whole(order[1])) is not None):
            seen[host] = (epoch, seq)
    return FleetState(_whole(data.get("epoch")), _whole(data.get("published")),
                      stream.encode() if isinstance(stream, str) and _STREAM_ID.fullmatch(stream) else None,
                      seen), None


@dataclass
class FleetCounters:
    """What `portsentry status` shows of the fleet (not saved: counts since the start)."""

    published: int = 0
    received: int = 0
    applied: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    lag: float | None = None  # seconds from a peer's decision to its ban here, last one
    lag_max: float = 0.0
    publish_up: bool = False
    read_up: bool = False
    error: str | None = None
    down_since: float | None = None


class StateFile:
    """Writes the state; both fleet threads save, one at a time, or one would rename the other's
    half-written file away."""

    def __init__(self, path: str, fleet: str) -> None:
        self.path, self.fleet = path, fleet
        self._lock = threading.Lock()

    def write(self, state: FleetState) -> OSError | None:
        data = {"fleet": self.fleet, "epoch": state.epoch, "published": state.published,
                "stream": state.stream.decode() if state.stream else None,
                "seen": {host: list(order) for host, order in state.seen.items()}}
        temporary = f"{self.path}.tmp"
        with self._lock:
            try:
                with open(temporary, "w", encoding="utf-8") as handle:
                    json.dump(data, handle)
                os.replace(temporary, self.path)
            except OSError as error:
                return error
        return None
