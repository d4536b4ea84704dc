"""What the parts of the daemon share: the attributes Daemon.__init__ sets (declared here for its
parts in service.startup, service.reload and service.shutdown), and the methods of one part that
another calls, declared for the type checker only (each is defined once, in its part or in
service.daemon).

service.daemon holds the Daemon itself and says which thread owns which object; each part's
docstring says which thread runs it.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from portsentry.bans.lifecycle import BanManager
from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config
from portsentry.core.actions import Action, Block
from portsentry.core.engine import Engine
from portsentry.core.probe import IPAddress, Mode
from portsentry.fleet.node import FleetNode
from portsentry.journal.hits import HitTally
from portsentry.journal.journal import Journal
from portsentry.journal.telemetry import Telemetry
from portsentry.responders.classic import ClassicResponder
from portsentry.sensors.base import Hit, Sensor
from portsentry.service.blockqueue import BlockQueue
from portsentry.service.control import ControlServer
from portsentry.service.kernelbans import DroppedProbes, KernelBans
from portsentry.service.lane import LaneKeeper
from portsentry.service.maintenance import Maintenance
from portsentry.service.requests import Counters
from portsentry.service.resolver import Resolver

Clock = Callable[[], float]
Reloader = Callable[[], tuple[Config, IgnoreSource]]
SensorFactory = Callable[[Config], Sequence[Sensor]]


class DaemonState:
    """The state the Daemon's parts share; Daemon.__init__ sets it and says what each is for."""

    config: Config
    fleet: FleetNode | None
    modes: tuple[Mode, ...]
    journal: Journal
    ignore: IgnoreSource
    sensors: tuple[Sensor, ...]
    responder: ClassicResponder
    resolver: Resolver | None
    clock: Clock
    bans: BanManager | None
    telemetry: Telemetry
    reloader: Reloader | None
    sensor_factory: SensorFactory | None
    engine: Engine
    control: ControlServer | None
    active_bans: int
    _protected: frozenset[IPAddress]
    _kernel: KernelBans | None
    _dropped: DroppedProbes | None
    _selector: selectors.BaseSelector
    _wake_read: socket.socket
    _wake_write: socket.socket
    _maintenance: Maintenance
    _blocks: BlockQueue
    _late: ThreadPoolExecutor
    _admin: ThreadPoolExecutor
    _restored: bool
    _reruns: threading.Thread | None
    _stop_reruns: threading.Event
    _stopping: bool
    _reload_requested: bool
    _reopen_requested: bool
    _awaiting_name: dict[IPAddress, list[tuple[Hit, float]]]
    lane: LaneKeeper
    counters: Counters
    hits: HitTally

    if TYPE_CHECKING:
        def _kernel_bans(self, bans: BanManager) -> KernelBans: ...
        def _named(self, source: IPAddress, name: str) -> None: ...
        def perform(self, actions: list[Action], hit: Hit | None = None,
                    fields: dict[str, object] | None = None, sent: str | None = None) -> None: ...
        def _ignore_now(self, now: float) -> None: ...
        def _lane_block_over(self, block: Block, abandoned: bool = False) -> None: ...
        def _lane_compile(self) -> None: ...
        def _stop_lane(self) -> None: ...
        def _guarded(self, work: Callable[[Hit], None], hit: Hit) -> None: ...
        def handle(self, hit: Hit) -> None: ...
        def _run_main_calls(self) -> None: ...
