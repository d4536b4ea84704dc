"""What FleetNode's two threads share: the timings both loops go by, and the attributes
FleetNode.__init__ sets that its part in fleet.reader uses (declared here), with the node's
methods that part calls, declared for the type checker only (each is defined once, in
fleet.node).

fleet.node holds FleetNode and says which thread owns which object.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from portsentry.fleet.apply import Applier
from portsentry.fleet.gate import Gate
from portsentry.fleet.link import Link
from portsentry.fleet.settings import FleetSettings
from portsentry.fleet.tally import Tally

POLL = 0.5  # seconds between looks at the change feed when nothing woke the publisher
BLOCK_MS = 1000
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0

Logger = Callable[[str], None]
LinkFactory = Callable[[FleetSettings], Link]


class NodeState:
    """The state FleetNode's parts share; FleetNode.__init__ sets it and says what each is for."""

    settings: FleetSettings
    log: Logger
    gate: Gate
    tally: Tally
    applier: Applier
    stream: bytes | None
    _link_factory: LinkFactory
    _lock: threading.Lock
    _links: dict[str, Link]
    _stop: threading.Event
    _past: bytes | None
    _read_state: tuple[bytes | None, dict[str, tuple[int, int]]]

    if TYPE_CHECKING:
        def _save(self, force: bool = False) -> None: ...
        def _backoff(self, delay: float) -> float: ...
        def _link_lost(self, link: Link | None, which: str, error: BaseException, delay: float) -> float: ...
        def _connect(self, which: str) -> Link: ...
