"""The native backend's side of the ban lifecycle, part of BanManager (bans.lifecycle):

- `ban_native`: a ban's kernel add (the NATIVE step, from the thread that carries out the block),
  for as long as its record says when that is longer; `_claim_slot`, BAN_RATE_LIMIT's kernel
  slots for a scan's ban (a responder thread, from `enforce`).
- the kernel's first-probe bans that nobody recorded (service.kernelbans): `record_kernel_ban`
  and `lift_kernel_ban` on the maintenance thread, never waiting for an address's turn;
  `finish_kernel_ban`, the rest of their steps, on a kernel-late worker.
- the maintenance thread's `repair` (once a minute: a flushed ruleset, routes a network restart
  took) and `retime` (the wall clock was set back), which put the active bans back in the kernel.

Every kernel add that reads the record holds the lock a lift holds from its kernel removal to its
record, so that no ban goes back in the kernel after its lift.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from portsentry.bans.recording import Recording
from portsentry.bans.store import StoreError
from portsentry.core import messages
from portsentry.core.actions import Block, StepKind
from portsentry.core.probe import IPAddress, Mode
from portsentry.responders.backend import BackendError
from portsentry.responders.classic import ClassicResponder


class NativeBans(Recording):
    """BanManager's kernel adds and the kernel's own bans."""

    def _claim_slot(self, block: Block) -> bool:
        """Whether the kernel's BAN_RATE_LIMIT slots let this scan's ban in (taking one); the
        engine's guard let it in already, but it does not see the kernel's first-probe bans whose
        copies it refused or never got, nor do they see its bans without this."""
        if self.backend is None:
            return True
        probe = block.probe
        try:
            if self.backend.claim_ban_slot(probe.source):
                return True
        except (BackendError, OSError) as error:  # the ban matters more than the cap's count
            self._log(messages.native_block_failed(str(probe.source), f"{self.backend.name} (ban rate "
                                                   "slot)", str(error)))
            return True
        self._log(messages.block_refused(probe, "ban rate limit reached (BAN_RATE_LIMIT's slots in "
                                         "the kernel are taken by this minute's bans)"))
        return False

    def ban_native(self, address: IPAddress, duration: float | None,
                   failed: list[str] | None = None, retimed: bool = False) -> bool:
        """Put `address` in the kernel for `duration` seconds, or for as long as its record says
        when that is longer: the store keeps the longer of two bans (a fleet peer's for good, a
        scan's for BLOCK_TIME), and the kernel must not drop the host before the record ends.
        The line said of a failure goes to `failed` too. `retimed`: a ban in force given a later
        end, said as that already; "has been blocked" would read as a new ban."""
        if self.backend is None:
            return False
        # Under the lock a fleet batch holds from its kernel add to its record, so the record read
        # here is not about to be lengthened by a batch whose longer kernel add this one undoes.
        with self._lock:
            duration = self._held_for(address, duration)
            try:
                self.backend.add(address, duration)
            except (BackendError, OSError) as error:
                line = messages.native_block_failed(str(address), self.backend.describe(), str(error))
                self._log(line)
                if failed is not None:
                    failed.append(line)
                return False
        if not retimed:
            self._log(messages.blocked_via_native(str(address), self.backend.name, duration))
        return True

    def _held_for(self, address: IPAddress, duration: float | None) -> float | None:
        """The longer of `duration` and what is left of the recorded ban of `address`."""
        if duration is None:
            return None
        try:
            ban = self.store.get(address)
        except StoreError:
            return duration  # the record may be held in memory: the ban itself must go in
        now = time.time()
        if ban is None or not ban.active(now):
            return duration
        return None if ban.expires is None else max(duration, ban.expires - now)

    def record_kernel_ban(self, address: IPAddress, mode: str, port: int, now: float,
                          said: Callable[[], None] = lambda: None,
                          still: Callable[[], bool] = lambda: True,
                          block: Block | None = None) -> bool | None:
        """A first-probe ban the kernel made and nobody recorded: record it (then `said`), then
        give it the policy's timeout (longer for repeat offenders). In turn with lifts of the
        address, like `enforce`; False when a record came meanwhile (the NFLOG copy was late) or
        `still` says its caught entry has gone (an unblock since it was read: recorded, the ban
        went back in the kernel). None, with nothing done, while a ban or lift of the address is
        under way: its commands may run for COMMAND_TIMEOUT, and the maintenance thread asking
        must not wait for them. `block`: the steps a ban of this probe gets; its hosts.deny line
        is recorded here, and the steps run by `finish_kernel_ban` (which marks KILL_ROUTE)."""
        with self._turns.turn(address, wait=False) as free:
            if not free:
                return None
            ban = self.store.get(address)
            if ban is not None and ban.active(now):
                return False
            if not still():
                return False
            duration = self.duration(address, now)
            line = ClassicResponder.intended_line(block) if block is not None else None
            # No ROUTE_MARK yet: KILL_ROUTE runs later, in another turn (finish_kernel_ban), and
            # a lift in between must not run KILL_ROUTE_UNDO for a route never made here.
            saved = self.remember(address, reason="kernel ban", mode=mode, port=port, now=now,
                                  duration=duration, hosts_deny_line=line, native=True)
            said()
            if self.ban_native(address, duration):
                reason = f"scan: {port}/{Mode(mode).protocol.value.lower()}"
                self._said_ban(address, (StepKind.NATIVE,), duration, reason, saved)
            return True

    def finish_kernel_ban(self, block: Block, responder: ClassicResponder,
                          clock: Callable[[], float] = time.time) -> bool:
        """The rest of a kernel ban recorded late (record_kernel_ban): its hosts.deny line,
        KILL_ROUTE and KILL_RUN_CMD, as any ban of the probe gets them (a ban made while the daemon
        was stopped got the kernel set alone). Off the maintenance thread: commands may run for
        COMMAND_TIMEOUT. In turn with lifts, and only while the ban is in force: a lift that came
        first must not be followed by its line or its route. True when the ban is in force."""
        address = block.probe.source
        rest = Block(block.probe, tuple(step for step in block.steps if step.kind is not StepKind.NATIVE))
        route = any(step.kind is StepKind.ROUTE for step in rest.steps)
        with self._turns.turn(address):
            now = clock()  # after the wait for the turn
            try:
                ban = self.store.get(address)
            except StoreError as error:
                self._store_failed(error)
                return False
            if ban is None or not ban.active(now):
                return False
            if rest.steps:
                duration = None if ban.expires is None else max(ban.expires - now, 1.0)
                if route:  # recorded before it runs, as a ban made here records it
                    try:
                        self.store.mark_routed(address)
                    except StoreError as error:
                        self._store_failed(error)
                carried = responder.run_steps(rest, duration, self)
                if route and StepKind.ROUTE not in carried.held_by:
                    self._unmark_route(address)
        return True

    def lift_kernel_ban(self, address: IPAddress, now: float) -> bool | None:
        """Take a first-probe ban nobody recorded out of the kernel (its source is spared after
        all). In turn with bans of the address, and under the lock a fleet batch holds from its
        kernel add to its record: a scan's or a peer's ban recorded since settling looked stays
        in the kernel. True when removed, False when a ban is on record now; None, with nothing
        done, while a ban or lift of the address is under way. BackendError and OSError pass."""
        assert self.backend is not None
        with self._turns.turn(address, wait=False) as free:
            if not free:
                return None
            with self._lock:
                ban = self.store.get(address)
                if ban is not None and ban.active(now):
                    return False
                self.backend.remove(address)
        return True

    def repair(self, now: float) -> None:
        """Once a minute: if someone flushed the ruleset, rebuild our table and re-add the bans;
        routes that a network restart took are put back (RouteBackend.restore_lost)."""
        if self.backend is None:
            return
        try:
            rebuilt = self.backend.repair_capture()
        except (BackendError, OSError) as error:
            self._log(messages.native_block_failed("(repair)", self.backend.name, str(error)))
            return
        if rebuilt:
            self._log(messages.table_rebuilt(self.backend.describe()))
            self._readd(now, "(repair)")
            return
        backend = self.backend
        # Under the lock a lift holds from its kernel removal to its record: a ban lifted between
        # the read and the add would be back in the kernel with no record left.
        with self._lock:
            try:
                lost = backend.restore_lost(
                    lambda: [packed for packed, _expires in self.store.active_packed(now)])
            except (BackendError, OSError, StoreError) as error:
                self._log(messages.native_block_failed("(repair)", backend.name, str(error)))
                return
        if lost:
            self._log(f"adminalert: {lost} bans were missing from {backend.describe()} (a network "
                      "restart?) and are back")

    def retime(self, now: float) -> None:
        """The wall clock was set back: give every ban in the kernel the time the store leaves it.
        The kernel times its elements on a clock that did not jump, so they left the set while the
        store, on the wall clock, still listed them in force (and the engine took their scans as
        "already blocked")."""
        if self.backend is not None and (count := self._readd(now, "(clock set back)")):
            self._log(f"adminalert: the clock was set back: {count} bans given their time left "
                      f"again in {self.backend.name}")

    def _readd(self, now: float, what: str) -> int:
        """Every active ban into the kernel with its time left; how many (0 on failure)."""
        assert self.backend is not None
        # Read and re-added under the lock a lift holds from its kernel removal to its record: a
        # ban lifted in between went back in the kernel with no record left (for ever, with
        # BLOCK_TIME 0).
        with self._lock:
            try:
                active = self.store.active(now)
                self.backend.add_many(
                    (ban.address, None if ban.expires is None else max(ban.expires - now, 1.0))
                    for ban in active)
            except (BackendError, OSError, StoreError) as error:
                self._log(messages.native_block_failed(what, self.backend.name, str(error)))
                return 0
        return len(active)
