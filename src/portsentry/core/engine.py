"""The decision engine: given a probe and the time, decide what to log and whom to block.

It does no I/O and reads no clock, so every branch is unit-tested with plain lists of probes.
The order of checks is 1.2's (reference §5.1): ignore list, scan trigger, banner, detection line,
already-blocked, then BLOCK_TCP/BLOCK_UDP.

SCAN_TRIGGER counts as 1.2 does: each mode remembers the sources of its most recent hits in a
ring; a hit fires when 1 + (earlier hits from the same source still in the ring) reaches the
trigger, so 0 and 1 both fire on the first hit and N fires on the N-th hit, repeats to the same
port included, and every later hit fires again. 1.2's ring held 50 hits and silently misbehaved
for larger triggers; ours holds max(50, 2 * SCAN_TRIGGER) so any trigger works.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address

from portsentry.core import messages
from portsentry.core.actions import Action, Block, Decision, Log, Outcome, Record, SendBanner, Step, StepKind
from portsentry.core.flood import DEFAULT_LIMIT, DEFAULT_WINDOW, RepeatLimiter
from portsentry.core.guard import BanGuard, BoundedSet, GuardSettings
from portsentry.core.probe import IPAddress, Mode, Probe, Protocol

RING_CAPACITY = 50
BLOCKED_CAPACITY = 65536
PENDING_CAPACITY = 64  # hits kept per host while its block is under way; more are dropped


def _nobody(_source: IPAddress) -> None:
    pass


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class EngineSettings:
    """The part of the configuration the engine decides with."""

    scan_trigger: int = 0
    block_tcp: int = 0
    block_udp: int = 0
    kill_route: str | None = None
    kill_hosts_deny: str | None = None
    kill_run_cmd: str | None = None
    kill_run_cmd_first: bool = False
    port_banner: str | None = None
    native_ban: bool = False
    log_repeat_limit: int = DEFAULT_LIMIT
    log_repeat_window: float = DEFAULT_WINDOW
    guard: GuardSettings = field(default_factory=GuardSettings)  # BAN_BACKEND is not "none"

    def block_level(self, protocol: Protocol) -> int:
        return self.block_tcp if protocol is Protocol.TCP else self.block_udp

    def steps(self, level: int) -> tuple[Step, ...]:
        """The blocking steps for BLOCK_x = level, in 1.2's order (reference §2.4)."""
        run_cmd = (Step(StepKind.RUN_CMD, self.kill_run_cmd),) if self.kill_run_cmd else ()
        if level == 2:
            return run_cmd
        if level != 1:
            return ()
        blocking: tuple[Step, ...] = ()
        if self.native_ban:
            blocking += (Step(StepKind.NATIVE, ""),)
        if self.kill_hosts_deny:
            blocking += (Step(StepKind.HOSTS_DENY, self.kill_hosts_deny),)
        if self.kill_route:
            blocking += (Step(StepKind.ROUTE, self.kill_route),)
        return run_cmd + blocking if self.kill_run_cmd_first else blocking + run_cmd


@dataclass
class TriggerRing:
    """The most recent hit sources of one mode, with a count per source for O(1) lookups.

    Sources are held packed: an address object hashes in Python (a hex string each time, six
    times a hit), a bytes key once, in C, and it is half the size."""

    capacity: int
    _order: deque[bytes] = field(default_factory=deque)
    _counts: dict[bytes, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._order)

    def hit(self, source: IPAddress) -> int:
        """Record a hit and return its number among the remembered hits of that source."""
        key = source.packed
        counts, order = self._counts, self._order
        number = counts.get(key, 0) + 1
        while len(order) >= self.capacity:
            oldest = order.popleft()
            left = counts[oldest] - 1
            if left > 0:
                counts[oldest] = left
            else:
                del counts[oldest]
        order.append(key)
        counts[key] = counts.get(key, 0) + 1
        return number


class Engine:
    """Turns probes into actions. `ignore` may be replaced at any time (live-edited ignore file)."""

    def __init__(self, settings: EngineSettings, ignore: Container[IPAddress]) -> None:
        self.settings = settings
        self.ignore = ignore
        capacity = max(RING_CAPACITY, 2 * settings.scan_trigger)
        self._rings: dict[Mode, TriggerRing] = {mode: TriggerRing(capacity) for mode in Mode}
        # Blocked (or being blocked) sources per mode: 1.2 kept one blocked file per mode.
        # Bounded: an evicted host is simply acted on again (all blocking steps are idempotent).
        self._blocked: dict[Mode, BoundedSet] = {mode: BoundedSet(BLOCKED_CAPACITY) for mode in Mode}
        self.guard = BanGuard(settings.guard)
        # Sources a Block succeeded for (or banned anywhere else): the ban store decides when they
        # are free again. Packed addresses: a million are loaded at start without an address
        # object each, and a probe's source packs in a tenth of a microsecond.
        self._banned: set[bytes] = set()
        self._repeats = RepeatLimiter(settings.log_repeat_limit, settings.log_repeat_window)
        # source -> hits that arrived while its Block was being carried out, in any mode: a hit
        # of another mode decided meanwhile started a second block (KILL_ROUTE run twice).
        self._pending: dict[IPAddress, list[tuple[Probe, float]]] = {}
        # Hits past PENDING_CAPACITY while a block is under way: (how many, the last), said in one
        # line when the block is done, so none goes unmentioned.
        self._pending_over: dict[IPAddress, tuple[int, Probe]] = {}
        # Sources whose block is under way and whose ban the store's feed said was lifted since:
        # the feed and the block's outcome come from two threads, and an unblock that waited for
        # the block reached this engine first. Lifted again once the outcome is in.
        self._lifted_meanwhile: set[IPAddress] = set()
        # The fast lane (service.lane) must never act for a source the engine holds anything
        # about: told of each source it starts to hold and of each it lets go of entirely.
        self.holding: Callable[[IPAddress], None] = _nobody
        self.released: Callable[[IPAddress], None] = _nobody
        self.resynced: Callable[[], None] = _nothing

    def held(self) -> Iterator[bytes]:
        """Every source the engine holds something about, packed (some more than once)."""
        yield from self._banned
        for blocked in self._blocked.values():
            yield from (source.packed for source in blocked)
        yield from (source.packed for source in self._pending)

    def _holds(self, source: IPAddress) -> bool:
        return (source.packed in self._banned or source in self._pending
                or any(source in blocked for blocked in self._blocked.values()))

    def _guarded(self, probe: Probe, now: float, actions: list[Action], made: bool = False) -> Outcome | None:
        """What to do instead of blocking, or None when the guard lets the block go. `made`: the
        fast lane has made the ban within its share of the rate cap, which counts it here."""
        quiet: list[Action] = [a for a in actions if not isinstance(a, Log)]
        reason = self.guard.refusal(probe, now)
        if reason is not None:
            self.guard.refused_total += 1
            if self.guard.should_log_refusal(probe.source, now):
                refusal = Log(messages.block_refused(probe, reason))
                return Outcome([*actions, refusal], Decision.REFUSED, reason)
            return Outcome(quiet, Decision.REFUSED, reason)
        if made:
            self.guard.count_ban(now)
            return None
        if self.guard.rate_limited(probe.source, now):
            reason = "ban rate limit reached"
            if self.guard.count_rate_limited(now):
                limit = self.settings.guard.ban_rate_limit
                return Outcome([*actions, Log(messages.rate_limit_reached(limit))], Decision.REFUSED, reason)
            return Outcome(quiet, Decision.REFUSED, reason)
        return None

    def tick(self, now: float) -> list[Action]:
        """Once a second: summary lines for repeat windows and rate-limit minutes that ended."""
        actions: list[Action] = [Log(text) for text in self._repeats.flush(now)]
        if count := self.guard.rate_summary(now):
            actions.append(Log(messages.rate_limit_summary(count)))
        return actions

    def close(self) -> list[Action]:
        """At shutdown: summary lines of every repeat window still open, so no count is lost."""
        return [Log(text) for text in self._repeats.flush_all()]

    def state_sizes(self) -> dict[str, int]:
        """Entries per bounded table, for status and metrics."""
        return {
            "trigger_ring": sum(len(ring) for ring in self._rings.values()),
            "blocked": sum(len(blocked) for blocked in self._blocked.values()),
            "repeat_windows": len(self._repeats),
            "pending_blocks": len(self._pending),
            **self.guard.sizes(),
        }

    def update_settings(self, settings: EngineSettings) -> None:
        """A reload: new settings, same memory of hits and blocked hosts."""
        self.settings = settings
        # The guard keeps its memory (bans this minute, evidence, refusals logged); the caps and
        # SENSITIVE_NETWORKS are the new ones, as the kernel's first-probe ban gets them.
        self.guard.settings = settings.guard
        self._repeats.limit = settings.log_repeat_limit
        self._repeats.window = settings.log_repeat_window
        for ring in self._rings.values():
            ring.capacity = max(RING_CAPACITY, 2 * settings.scan_trigger)

    def is_blocked(self, mode: Mode, source: IPAddress) -> bool:
        return source in self._blocked[mode] or source.packed in self._banned


    def observe(self, probe: Probe, now: float, made: bool = False) -> Outcome:
        """`made`: the fast lane has already written this probe's detection line and begun its
        block; the engine decides it as any other, and the daemon checks that it agrees."""
        if probe.source in self.ignore:
            return Outcome([Log(messages.ignored_host(probe), verbose=True)], Decision.IGNORED)
        self.guard.note(probe, now)

        trigger = self.settings.scan_trigger
        number = self._rings[probe.mode].hit(probe.source)
        if number < trigger:
            return Outcome([Log(messages.below_trigger(probe, number, trigger), verbose=True)],
                           Decision.BELOW_TRIGGER, count=number)

        actions: list[Action] = []
        if probe.mode.is_classic and self.settings.port_banner:
            actions.append(SendBanner(self.settings.port_banner))
        # UDP: the banner goes once per source, not to one already blocked (or being blocked):
        # a datagram forged "from" an echo service had it answer every banner, and 1.2 answered
        # every answer, without end. TCP keeps 1.2's banner per connection (a handshake, no loop).
        udp = probe.mode.protocol is Protocol.UDP
        waiting = self._pending.get(probe.source)
        if waiting is not None:
            # Its block is under way: decide once the outcome is known, so no line claims
            # "already blocked" before "has been blocked" (1.2 blocked synchronously).
            if len(waiting) < PENDING_CAPACITY:
                waiting.append((probe, now))
            else:
                key = probe.source
                self._pending_over[key] = (self._pending_over.get(key, (0, probe))[0] + 1, probe)
            return Outcome([] if udp else actions, Decision.ALREADY_BLOCKED)
        decided = self._decide(probe, now, made)
        if decided.decision is Decision.REFUSED:
            # A source the guard refused (forged, protected, over the rate cap) gets no banner:
            # answering a UDP datagram from a forged source makes us a reflector for it.
            return decided
        if udp and decided.decision is Decision.ALREADY_BLOCKED:
            return decided
        return Outcome(actions + decided.actions, decided.decision, decided.reason)

    def _decide(self, probe: Probe, now: float, made: bool = False) -> Outcome:
        """Everything after the ignore list and the scan trigger."""
        actions: list[Action] = []
        blocked = self._blocked[probe.mode]
        # Banned anywhere (this daemon, `block`, restore, later the fleet) counts in every mode.
        repeat = probe.source in blocked or probe.source.packed in self._banned
        if repeat:
            allowed, summaries = self._repeats.allow(probe, now)
            actions += [Log(text) for text in summaries]
            if not allowed:
                return Outcome(actions, Decision.ALREADY_BLOCKED)
        actions.append(Log(messages.detection(probe)))
        if probe.ip_options and not probe.mode.is_classic:
            actions.append(Log(messages.ip_options(probe)))
        if repeat:
            actions.append(Log(messages.already_blocked(probe)))
            return Outcome(actions, Decision.ALREADY_BLOCKED)

        level = self.settings.block_level(probe.mode.protocol)
        if level > 0:
            refused = self._guarded(probe, now, actions, made)
            if refused is not None:
                return refused
        steps = self.settings.steps(level)
        blocked.touch(probe.source, now)
        self.holding(probe.source)
        decision = Decision.BLOCK if level > 0 and steps else Decision.LOG
        if level == 0:
            # 1.2 records a log-only host as blocked too, so later hits say "already blocked".
            actions.append(Log(messages.block_disabled(probe.mode.protocol)))
            actions.append(Record(probe, now, blocked=False))
        elif steps:
            self._pending[probe.source] = []
            actions.append(Block(probe, steps))
        else:
            actions.append(Record(probe, now, blocked=False))
        return Outcome(actions, decision)

    def sync_bans(self, active: Iterable[bytes]) -> None:
        """Make the engine agree with the ban store (packed addresses of every ban in force):
        lifted bans (expired, or `unblock`) are forgotten so the next hit acts again; bans made
        elsewhere (`block`) count as blocked. Used at start and when the change feed cannot be
        followed; one set, not a copy per mode (a million bans once filled six bounded tables)."""
        banned = set(active)
        for packed in self._banned - banned:
            source = ip_address(packed)
            for blocked in self._blocked.values():
                blocked.discard(source)
        self._banned = banned
        for source in self._pending:
            if source.packed in banned:
                self._lifted_meanwhile.discard(source)
            else:
                self._lifted_meanwhile.add(source)
        self.resynced()

    def apply_ban_changes(self, changes: Iterable[tuple[IPAddress, bool]]) -> None:
        """The ban store's change feed, in order: (address, True) for a ban made or extended
        anywhere (`block`, restore, the daemon's own blocks), (address, False) for one lifted
        (expired, `unblock`), which is forgotten so the next hit acts again. Costs what
        changed, not what is banned."""
        for source, banned in changes:
            if banned:
                self._banned.add(source.packed)
                self._lifted_meanwhile.discard(source)
                self.holding(source)
            else:
                self._forget(source)
                if source in self._pending:
                    self._lifted_meanwhile.add(source)

    def _forget(self, source: IPAddress) -> None:
        self._banned.discard(source.packed)
        for blocked in self._blocked.values():
            blocked.discard(source)
        if source not in self._pending:
            self.released(source)

    def finished(self, block: Block, succeeded: bool | None, now: float) -> list[Action]:
        """The daemon reports the outcome of a Block it carried out (None: refused before any
        step ran, by the kernel's BAN_RATE_LIMIT slots, and said by the refusal); hits that
        arrived meanwhile are decided now, in order."""
        probe = block.probe
        waiting = self._pending.pop(probe.source, [])
        actions: list[Action]
        if succeeded:
            if any(step.kind is not StepKind.RUN_CMD for step in block.steps):
                # BLOCK_x=2 only ran KILL_RUN_CMD: no ban (the ban store records none either),
                # so other modes still act; this mode's repeats are "already blocked" (_blocked).
                self._banned.add(probe.source.packed)
            actions = [Record(probe, now)]
        else:
            # Forget the attempt so the next hit tries again.
            self._blocked[probe.mode].discard(probe.source)
            if not self._holds(probe.source):
                self.released(probe.source)
            # A refusal is not a failure: "Could not block host" after the refusal's own line
            # told the admin a step had failed when none had run.
            actions = [] if succeeded is None else [Log(messages.block_failed(probe))]
        for later, at in waiting:
            retry = self._pending.get(later.source)
            # An earlier of these hits started a new block: after a failure, or after a block
            # that only ran KILL_RUN_CMD (BLOCK_x=2), when another mode then blocks.
            if retry is not None:
                retry.append((later, at))
                continue
            actions += self._decide(later, at).actions
        over = self._pending_over.pop(probe.source, None)
        if over is not None:
            actions.append(Log(messages.pending_overflow(over[1], over[0])))
        if probe.source in self._lifted_meanwhile and probe.source not in self._pending:
            # The lift came after the block (it waited for the address's turn) and after the
            # hits that waited for it: it goes last, so the next hit acts again.
            self._lifted_meanwhile.discard(probe.source)
            self._forget(probe.source)
        return actions
