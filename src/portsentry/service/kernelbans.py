"""The daemon's side of the first-probe ban in the kernel (responders.nft_capture): the kernel
bans a qualifying probe's source on the spot; the daemon stays the authority over it.

- Guards: the sources the kernel must spare are pushed to its sets whenever they change: own
  addresses and the ignore list (protect: neither banned nor copied to the daemon, which only
  ever logged them at verbose level), and gateways, resolvers, impossible sources, this host's
  subnet broadcasts and SENSITIVE_NETWORKS (nokernel: copied, and the daemon decides, so a forged
  probe from the gateway is still refused and said so, as without the kernel path).
- Settling: every kernel ban also leaves a caught entry (source, protocol, port). Normally the
  NFLOG copy reaches the engine, the ban lifecycle records the ban (with the policy's timeout
  for repeat offenders), and the entry is released. A caught source that must be spared after
  all (the guards changed, a service started on the port a moment ago) has its kernel ban lifted;
  one that nobody recorded within GRACE seconds (the NFLOG copy was lost, or the daemon was not
  running, or stopped with the copy still queued) is recorded now, and said so, and then gets
  what a ban of its probe gets (LateSteps): the hosts.deny line, KILL_ROUTE, KILL_RUN_CMD and the
  history line.

- Counting: probes of a banned source never reach the capture (the drop chain comes first), so
  the kernel counts them per source (nft_capture.count_rules) and `DroppedProbes` writes one
  summary line per source and round with the count since the last round.

Threads: the main loop builds a Guards snapshot and calls `update`, which says whether it must be
pushed; `push` then runs on an admin worker, `settle` on the maintenance thread. They share only
the snapshot, replaced whole, never changed in place; the backend and the lifecycle are
thread-safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from portsentry.bans.lifecycle import BanManager
from portsentry.core import messages
from portsentry.core.actions import Block, Step
from portsentry.core.addresses import IMPOSSIBLE_NETWORKS, canonical, impossible_source
from portsentry.core.probe import IPAddress, Mode, Probe, Protocol
from portsentry.responders.backend import BackendError, Caught, Guarded
from portsentry.responders.classic import ClassicResponder
from portsentry.sensors.listeners import ListeningPorts

SUMMARY_EVERY = 5.0  # seconds between reads of the kernel's counts of dropped probes
GRACE = 3.0  # seconds a caught entry waits for the daemon's own record before it is made here
Network = IPv4Network | IPv6Network
KERNEL_BAN_KIND = "kernel ban"  # the probe a late record stands for: its kind is not known


@dataclass(frozen=True)
class LateSteps:
    """What a kernel ban recorded late gets besides its record, as a scan's block does: the steps
    BLOCK_TCP/BLOCK_UDP give its protocol now (`steps`), carried out by `responder` on a worker
    (`submit`: never the maintenance thread, which must not wait for KILL_ROUTE), then `recorded`
    (the history and blocked-file lines, on the main loop)."""

    responder: ClassicResponder
    steps: Callable[[Protocol], tuple[Step, ...]]
    submit: Callable[[Callable[[], None]], object]
    recorded: Callable[[Probe, float], None]
    clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class Guards:
    """What the kernel must spare, as the main loop last saw it."""

    ignored: tuple[Network, ...] = ()  # the ignore list in force, own addresses included
    protected: frozenset[IPAddress] = frozenset()  # gateways and resolvers
    sensitive: tuple[Network, ...] = ()  # SENSITIVE_NETWORKS
    broadcasts: frozenset[IPAddress] = frozenset()  # this host's subnet broadcasts

    def protect(self) -> list[Guarded]:
        return list(self.ignored)

    def nokernel(self) -> list[Guarded]:
        return [*IMPOSSIBLE_NETWORKS, *self.protected, *self.broadcasts, *self.sensitive]

    def spared(self, address: IPAddress) -> str | None:
        """Why the kernel must not have banned `address`, or None."""
        plain = canonical(address)
        if plain in self.protected:
            return "it is a gateway or DNS resolver of this host"
        if any(plain in network for network in self.ignored if network.version == plain.version):
            return "it is on the ignore list (or one of this host's addresses)"
        if (bad := impossible_source(plain, self.broadcasts)) is not None:
            return f"it is a {bad} address"
        if any(plain in network for network in self.sensitive if network.version == plain.version):
            return "it is in SENSITIVE_NETWORKS, where PortSentry decides"
        return None


class KernelBans:
    def __init__(self, bans: BanManager, log: Callable[[str], None], grace: float = GRACE,
                 listeners: dict[Protocol, ListeningPorts] | None = None,
                 late: LateSteps | None = None) -> None:
        self.bans = bans
        self._late = late
        self._log = log
        self.grace = grace
        self._guards: Guards | None = None
        self._pushed: Guards | None = None
        self._first_seen: dict[Caught, float] = {}
        # The caught entries as last read, and BanManager.unblocks just before that read.
        self._present: set[Caught] = set()
        self._unblocks_seen = 0
        # Its own sock_diag view: the sensor's belongs to the main loop.
        self._listeners = listeners or {protocol: ListeningPorts(protocol) for protocol in Protocol}
        self.recorded_late = 0
        self.lifted = 0

    # -- guards (main loop, then an admin worker) -----------------------------------------------

    def update(self, guards: Guards) -> bool:
        """Main loop: the guards now in force; True when they differ from what was pushed."""
        self._guards = guards
        return guards != self._pushed

    def push(self) -> None:
        """Put the latest guards into the kernel's sets (one transaction)."""
        guards = self._guards
        backend = self.bans.backend
        if guards is None or backend is None or guards == self._pushed:
            return
        try:
            backend.set_guards(guards.protect(), guards.nokernel())
        except (BackendError, OSError) as error:
            self._log(messages.config_error(f"cannot update the kernel's guarded sources: {error}"))
            return
        self._pushed = guards

    # -- settling (maintenance thread) ------------------------------------------------------------

    def settle(self, now: float) -> None:
        backend = self.bans.backend
        # Not only while the first-probe ban is on: the bans it made before a reload turned it
        # off (or before a start without it) are settled too, or they stay in the kernel unrecorded.
        if backend is None or not backend.keeps_caught():
            return
        self._unblocks_seen = self.bans.unblocks
        entries = backend.caught()
        present = self._present = set(entries)
        self._first_seen = {entry: at for entry, at in self._first_seen.items() if entry in present}
        release: list[Caught] = []
        for entry in entries:
            first = self._first_seen.setdefault(entry, now)
            if self._settle(entry, now, now - first >= self.grace):
                release.append(entry)
        if release:
            backend.release_caught(release)
            for entry in release:
                self._first_seen.pop(entry, None)

    def _settle(self, entry: Caught, now: float, overdue: bool) -> bool:
        """True when `entry` is settled (and can be released)."""
        address, protocol, port = entry
        ban = self.bans.store.get(address)
        if ban is not None and ban.active(now):
            return True  # the daemon recorded it: the lifecycle owns it now
        why = self._guards.spared(address) if self._guards is not None else None
        if why is None and self._live(protocol, port, now):
            why = f"{protocol} port {port} has a live service"
        if why is not None:
            return self._lift(address, why, now)
        if not overdue:
            return False
        def said() -> None:
            self._log(messages.kernel_ban_recorded(str(address), protocol.value, port))

        mode = f"s{protocol.value.lower()}"
        late = self._late
        block = (Block(Probe(address, port, Mode(mode), KERNEL_BAN_KIND), late.steps(protocol))
                 if late is not None else None)
        recorded = self.bans.record_kernel_ban(address, mode, port, now, said,
                                               lambda: self._still_caught(entry), block)
        if recorded is None:
            return False  # the address's ban or lift is running its commands: the next round
        if recorded:
            self.recorded_late += 1
            if late is not None and block is not None:
                late.submit(lambda: self._finish(late, block))
        return True

    def _finish(self, late: LateSteps, block: Block) -> None:
        """On a worker: the late ban's hosts.deny line, KILL_ROUTE and KILL_RUN_CMD, then its
        history line, as the engine's Record gives a scan's ban once its steps are done."""
        try:
            if self.bans.finish_kernel_ban(block, late.responder, late.clock):
                late.recorded(block.probe, late.clock())
        except Exception as error:  # the worker's Future is not looked at: said here
            self._log(messages.config_error(f"internal error completing a kernel ban: {error!r}"))

    def _live(self, protocol: Protocol, port: int, now: float) -> bool:
        listener = self._listeners[protocol]
        listener.refresh(now)
        return listener.confirm(port, now)

    def _still_caught(self, entry: Caught) -> bool:
        """Under the address's turn: whether `entry` is still caught. Read again only when an
        unblock forgot caught entries since the last read (it may have been this one)."""
        backend = self.bans.backend
        assert backend is not None
        if self.bans.unblocks != self._unblocks_seen:
            self._unblocks_seen = self.bans.unblocks
            self._present = set(backend.caught())
        return entry in self._present

    def _lift(self, address: IPAddress, why: str, now: float) -> bool:
        """True when settled: lifted, recorded meanwhile, or failed (said); False while busy."""
        try:
            lifted = self.bans.lift_kernel_ban(address, now)
        except (BackendError, OSError) as error:
            self.bans.kernel_unsure = True
            self._log(messages.native_unblock_failed(str(address), str(error)))
            return True
        if lifted is None:
            return False  # the address's ban or lift is running its commands: the next round
        if lifted:
            self._log(messages.kernel_ban_lifted(str(address), why))
            self.lifted += 1
        return True


class DroppedProbes:
    """Summary lines for the probes the kernel dropped from banned sources. The kernel keeps a
    running count per source; this keeps the count it last reported, so each line says what is
    new. Counts present at the first read were made before this start and were reported by the
    run before (up to its last round): they are the baseline. Maintenance thread, and at
    shutdown the main thread once maintenance has stopped."""

    def __init__(self, bans: BanManager, log: Callable[[str], None], every: float = SUMMARY_EVERY) -> None:
        self.bans = bans
        self._log = log
        self.every = every
        self._reported: dict[IPAddress, int] | None = None
        self._next = 0.0
        self.total = 0  # probes reported so far (metrics)

    def summarize(self, now: float, force: bool = False) -> None:
        backend = self.bans.backend
        if backend is None or (now < self._next and not force):
            return
        self._next = now + self.every
        try:
            counts = backend.dropped()
        except (BackendError, OSError) as error:
            self._log(messages.config_error(f"cannot read the kernel's counts of dropped probes: {error}"))
            return
        if self._reported is None:
            self._reported = counts
            return
        for address, count in sorted(counts.items(), key=lambda item: (item[0].version, item[0])):
            before = self._reported.get(address, 0)
            # A smaller count is a new one: the old expired (DROPPED_TIMEOUT) and began again.
            new = count - before if count >= before else count
            if new > 0:
                self._log(messages.kernel_dropped(str(address), new))
                self.total += new
        self._reported = counts


def guards_of(ignored: Iterable[Network], protected: Iterable[IPAddress],
              sensitive: Iterable[Network], broadcasts: Iterable[IPAddress] = ()) -> Guards:
    return Guards(tuple(ignored), frozenset(protected), tuple(sensitive), frozenset(broadcasts))
