"""What every part of BanManager shares: the attributes BanManager.__init__ sets (declared here,
for its parts in bans.recording, bans.lifts and bans.native), how a store failure is said, the
wake-up of the fleet publisher, how long a ban lasts under the policy, and the event and count
of a ban made.

bans.lifecycle holds BanManager itself and says which thread touches what; the parts only
build on this state, so each transition still goes through the one object and its locks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from portsentry.bans.store import Ban, BanStore, StoreError, ban_duration
from portsentry.bans.turns import AddressTurns
from portsentry.core import messages
from portsentry.core.actions import StepKind
from portsentry.core.probe import IPAddress
from portsentry.journal.failures import BAN_STORE, WriteFailures
from portsentry.journal.telemetry import Telemetry
from portsentry.responders.backend import BanBackend
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.shell import CommandResult

if TYPE_CHECKING:
    from portsentry.bans.lifecycle import BanPolicy

Logger = Callable[[str], None]
Runner = Callable[[str, float], CommandResult]


class ManagerState:
    """The state BanManager's parts share; BanManager.__init__ sets it and says why each exists."""

    store: BanStore
    failures: WriteFailures | None
    backend: BanBackend | None
    hosts_deny: HostsDeny
    policy: BanPolicy
    _log: Logger
    log: Logger
    _run: Runner
    run: Runner
    _lock: threading.Lock
    _turns: AddressTurns
    telemetry: Telemetry
    on_change: Callable[[], None] | None
    unblocks: int
    kernel_unsure: bool

    def changed(self) -> None:
        # Read once: the fleet's stop (main thread) may clear it between a look and a call.
        wake = self.on_change
        if wake is not None:
            wake()

    def _store_failed(self, error: Exception, retry: bool = False) -> None:
        detail = f"{error}; will retry" if retry else str(error)
        if self.failures is not None:
            self.failures.failed(BAN_STORE, self.store.path, detail)
        else:
            self._log(messages.store_failed(detail))

    def duration_after(self, offences: int) -> float | None:
        """Seconds a ban lasts after `offences` earlier ones (None: forever)."""
        return ban_duration(self.policy.base, self.policy.factor, self.policy.cap, offences)

    def duration(self, address: IPAddress, now: float) -> float | None:
        """Seconds the next ban of `address` lasts, grown for repeat offenders."""
        if self.policy.base == 0:
            return None  # forever: no need to ask the store (this is on the way to the block)
        try:
            offences = self.store.offences(address, now)
        except StoreError as error:
            self._store_failed(error)
            offences = 0
        return ban_duration(self.policy.base, self.policy.factor, self.policy.cap, offences)

    def _said_ban(self, address: IPAddress, held_by: tuple[StepKind, ...], duration: float | None,
                  reason: str, saved: Ban | None) -> None:
        """The event and the count of a ban made, named by the first step that holds it: a ban
        held by hosts.deny or KILL_ROUTE alone (no BAN_BACKEND, the default) is a ban too."""
        if not held_by:
            return
        kind = held_by[0]
        backend = self.backend.name if kind is StepKind.NATIVE and self.backend is not None else kind.value
        count = None if saved is None else max(saved.offences - 1, 0)
        self.telemetry.ban(address, backend, duration, reason, time.time(), count=count)
