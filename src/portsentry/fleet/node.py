"""This host in the fleet: two threads, one publishing this host's bans and lifts, one applying
the others'.

Threads and ownership:
- fleet-publish owns the cursor into the ban store's change feed (`published`) and its Redis
  connection. It wakes when the ban lifecycle records a change (BanManager.on_change) and at
  least every POLL seconds (bans written by `portsentry block --file` straight to the store),
  sends the changes of origin "local" (bans, extensions, lifts; not expiries, which every host
  works out from the expiry it was given), and advances the cursor only once Redis took them:
  while Redis is away, the backlog waits in the store and goes out on reconnect. It keeps the
  mark of the last decision Redis took from it (fleet.link) and compares it with Redis's at
  every publish, every CHECK_EVERY seconds and on reconnect: when Redis lost what it was sent
  (a restart without persistence or from an older snapshot, a flush), it sends this host's
  active bans again and takes the unblocks Redis lost out of its active set, whether or not a
  command failed on the way.
- fleet-read owns the stream cursor, the Gate (replay order per host, rate cap) and its own
  Redis connection. It loads the fleet's active set when it has no cursor, and also when what
  followed its cursor is gone (trimmed, or lost by Redis), which every read checks; then it
  follows the stream with XREAD BLOCK and applies what the Gate lets through by way of the ban
  lifecycle (fleet.apply).
- Both write the state file (STATE_DIR/fleet.json, fleet.state) under the node's lock; the
  counters (fleet.tally) are read by `status` on the main loop.
Redis being down stops neither detection nor local bans: only these threads wait and retry.

Where the code is: this module holds FleetNode itself: its life (start, set_guards,
set_hosts_deny and stop on the main loop; wake on whichever thread records a ban change; resend
on fleet-read), the state file (_save, from both threads and the stop), `status` (the main
loop), and all that fleet-publish runs (_publish_loop down to _decision). What fleet-read runs
is fleet.reader (Reading, a part of FleetNode); the timings and state the two threads share are
declared in fleet.node_state. The parts that need none of the node's lock, state file or marks
are beside it (fleet.link, fleet.bounded, fleet.budget, fleet.cursor, fleet.apply, fleet.gate,
fleet.decision, fleet.tally).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from portsentry.bans.lifecycle import BanManager
from portsentry.bans.store import ORIGIN_LOCAL, Change, StoreError
from portsentry.core.probe import IPAddress
from portsentry.fleet.apply import Applier
from portsentry.fleet.decision import Decision, reachable
from portsentry.fleet.gate import Gate, Guards
from portsentry.fleet.link import Link, compare_marks, link_errors, mark, parse_mark
from portsentry.fleet.node_state import BACKOFF_FIRST, BACKOFF_MAX, BLOCK_MS, POLL, LinkFactory, Logger
from portsentry.fleet.reader import Reading
from portsentry.fleet.settings import FleetSettings
from portsentry.fleet.state import FleetState, StateFile, load_state
from portsentry.fleet.tally import Tally
from portsentry.journal.telemetry import Telemetry

PUBLISH_BATCH = 1000
PRUNE_EVERY = 30.0
CHECK_EVERY = 1.0  # seconds between looks at this host's mark in Redis while nothing is published
# At most REFILLS_MAX refills in REFILL_WINDOW seconds: a Redis that keeps losing data, or a copy
# of this host's state publishing under its id, must not make it resend every ban every second.
REFILLS_MAX, REFILL_WINDOW = 3, 60.0
SAVE_EVERY = 0.5  # seconds between state file writes; a crash re-sends or re-reads, harmlessly


class FleetNode(Reading):
    def __init__(self, settings: FleetSettings, bans: BanManager, state_dir: str, log: Logger,
                 telemetry: Telemetry | None = None, clock: Callable[[], float] = time.time,
                 link_factory: LinkFactory = Link, hosts_deny: str | None = None) -> None:
        self.settings = settings
        self.bans = bans
        self.log = log
        self.clock = clock
        self.hosts_deny = hosts_deny
        self._link_factory = link_factory
        self.path = os.path.join(state_dir, "fleet.json")
        self.gate = Gate(settings.host_id, settings.accept_hosts, settings.ban_rate_limit)
        self.tally = Tally(log, telemetry or Telemetry(), clock, settings.redacted)
        self.applier = Applier(settings, bans, self.gate, self.tally, clock, hosts_deny, self.resend)
        self._resend: set[IPAddress] = set()  # this host's bans to send again (stale lifts), under _lock
        self._lock = threading.Lock()  # the saved-state pair and when it was last written
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._links: dict[str, Link] = {}  # each thread's link, under _lock: the stop interrupts them
        self._saved_at = 0.0
        self._state_file = StateFile(self.path, settings.name)
        state, problem = load_state(self.path, settings.name)
        if problem is not None:
            self.log(f"fleet: {problem}")
        self.epoch: int = state.epoch or int(clock() * 1000)
        self.published: int | None = state.published
        # The mark of the last decision Redis took from this host; None until the first connect,
        # which therefore always publishes the active bans (a restart knows nothing of Redis).
        self._sent: bytes | None = None
        # The newest (epoch, seq) handed to Redis, taken or not: a publish cut short (a timeout, a
        # connection lost mid-batch) leaves Redis holding a mark between `_sent` and this one.
        self._tried: tuple[int, int] | None = None
        self._refills: deque[float] = deque()  # when Redis was last refilled, REFILL_WINDOW back
        # A loss seen while refills were at their cap: refilled at a later look, from the mark
        # Redis held when the loss was seen.
        self._owing = False
        self._owed_mark: bytes | None = None
        self.stream: bytes | None = state.stream
        # After loading the active set, the entries up to this id are read again: the fleet's
        # past, applied in order for the lifts among them, but not counted by the rate cap.
        self._past: bytes | None = None
        # The stream cursor with the replay order taken up to it, as one pair: a save from the
        # publisher in the middle of a batch must not store an order ahead of the cursor.
        self._read_state: tuple[bytes | None, dict[str, tuple[int, int]]] = (state.stream, dict(state.seen))
        self.gate.seen = state.seen

    # -- life ------------------------------------------------------------------------------------

    def start(self, guards: Guards) -> None:
        self.gate.set_guards(guards)
        self.bans.on_change = self.wake
        for name, target in (("fleet-publish", self._publish_loop), ("fleet-read", self._read_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self.log(f"fleet: joining {self.settings.name!r} at {self.settings.redacted} as "
                 f"{self.settings.host_id}")

    def set_guards(self, guards: Guards) -> None:
        self.gate.set_guards(guards)

    def set_hosts_deny(self, line: str | None) -> None:
        """A reload's KILL_HOSTS_DENY, for the peers' bans applied from now on (main loop; the
        reader takes it whole, once per batch)."""
        self.hosts_deny = self.applier.hosts_deny = line

    def wake(self) -> None:
        self._wake.set()

    def resend(self, address: IPAddress) -> None:
        """fleet-read: have the publisher send this host's ban of `address` again."""
        with self._lock:
            self._resend.add(address)
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        # A thread waiting on a Redis that stopped answering would hold the stop up to
        # READ_TIMEOUT: its command is cut short, and the thread ends.
        with self._lock:
            links = list(self._links.values())
        for link in links:
            link.interrupt()
        for thread in self._threads:
            thread.join(timeout=BLOCK_MS / 1000 + 5.0)
        self._threads = []
        self.bans.on_change = None
        self._save(force=True)

    # -- state file ------------------------------------------------------------------------------

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._saved_at < SAVE_EVERY:
                return
            self._saved_at = now
            stream, seen = self._read_state
            state = FleetState(self.epoch, self.published, stream, dict(seen))
        error = self._state_file.write(state)
        if error is not None:
            self.tally.say_once("save", f"fleet: cannot write {self.path}: {error}")

    # -- status ----------------------------------------------------------------------------------

    def status(self, last_change: int | None = None) -> dict[str, object]:
        """`last_change`: the newest change of the feed as the caller knows it. The daemon's main
        loop passes its own, never waiting for the store's lock (held for seconds by a big fleet
        batch or a write waiting for another process) while no packet is read."""
        backlog = None
        with contextlib.suppress(StoreError):
            if self.published is not None:
                newest = self.bans.store.last_change() if last_change is None else last_change
                backlog = max(0, newest - self.published)
        return {"name": self.settings.name, "host_id": self.settings.host_id, "redis": self.settings.redacted,
                **self.tally.status(), "backlog": backlog}

    def _backoff(self, delay: float) -> float:
        self._stop.wait(delay)
        return min(delay * 2, BACKOFF_MAX)

    def _connect(self, which: str) -> Link:
        """A new link for one thread (`which`: publish or read), known to the stop."""
        link = self._link_factory(self.settings)
        with self._lock:
            self._links[which] = link
        if self._stop.is_set():
            link.interrupt()  # the stop came while it was made
        return link

    def _link_lost(self, link: Link | None, which: str, error: BaseException, delay: float) -> float:
        """A Redis error in one thread's loop (`which`: publish_up or read_up): said through the
        tally (unless the stop cut the command short), the connection closed, the wait before the
        next try; the delay after it."""
        if not self._stop.is_set():
            self.tally.link(which, False, error)
        if link is not None:
            link.close()
        return self._backoff(delay)

    # -- publishing ------------------------------------------------------------------------------

    def _publish_loop(self) -> None:
        delay = BACKOFF_FIRST
        link: Link | None = None
        next_prune = next_check = 0.0
        fresh = False
        while not self._stop.is_set():
            try:
                if link is None:
                    link = self._connect("publish")
                    link.ping()
                    self.connected(link)
                    fresh = True
                    next_prune = 0.0
                    next_check = time.monotonic() + CHECK_EVERY
                more = self.publish_once(link)
                if not more:
                    self.resend_bans(link)
                if fresh:
                    # Not at the connect: a full Redis, or one whose ACL denies the script, answers
                    # PING and the mark, and was said "up" then "down" at every retry.
                    self.tally.link("publish_up", True)
                    delay, fresh = BACKOFF_FIRST, False
                # Timed by the monotonic clock: a wall clock set back a day stopped both for a day.
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    link.prune(self.clock())
                if not more and time.monotonic() >= next_check:
                    next_check = time.monotonic() + CHECK_EVERY
                    self.check_mark(link)
                if not more:
                    self._wake.wait(POLL)
                    self._wake.clear()
            except link_errors() as error:
                delay = self._link_lost(link, "publish_up", error, delay)
                link = None
            except StoreError as error:
                self.tally.say_once("store", f"fleet: cannot read the ban store: {error}")
                self._stop.wait(POLL)
            except Exception as error:  # a bug must not end publishing for the daemon's life
                if self._stop.is_set():
                    break  # the stop cut a command short (Link.interrupt)
                self.log(f"adminalert: internal error in the fleet publisher: {error!r}")
                link = None
                delay = self._backoff(delay)
        if link is not None:
            link.close()

    def connected(self, link: Link) -> None:
        """On (re)connect: where the feed cursor starts, and this host's active bans again unless
        Redis holds the last decision sent to it (a network blip, not a Redis that lost data)."""
        last = self.bans.store.last_change()
        if self.published is None or self.published > last:
            # First join, or a new ban store: its change ids start again, so a new epoch.
            if self.published is not None:
                self.epoch = int(self.clock() * 1000)
            self.published = last
        self.check_mark(link)

    def check_mark(self, link: Link, held: bytes | None = None, *, read: bool = True) -> bool:
        """Refill Redis with this host's state when its mark for this host says Redis lost what
        was sent (`held`, when the caller has already read it: `read` False). True if refilled."""
        if read:
            held = link.held_mark()
        if self._sent is not None and not self._owing:
            if held == self._sent:
                return False
            said = f"it holds {(held or b'none').decode(errors='replace')}, {self._sent.decode()} was sent"
            verdict = compare_marks(held, self._sent, self._tried)
            if verdict == "other":
                # A mark this host never sent: another portsentry publishes under its id. Not a
                # loss, and refilling would answer each of its publishes with all of this host's bans.
                self.tally.say_once("duplicate-id", f"fleet: another host publishes as "
                                    f"{self.settings.host_id!r} ({said}): give each host its own "
                                    "FLEET_HOST_ID; hosts sharing one take each other's bans for echoes")
                return False
            # Cut short, Redis took the first part; whether it held what came before, only the
            # lost answers would have said: sent again.
            what = "had a publish cut short" if verdict == "cut" else "lost decisions of this host"
            self.log(f"fleet: {self.settings.redacted} {what} ({said}): sending this host's active bans "
                     "again")
            self._owing, self._owed_mark = True, held
        if self._owing:
            now = time.monotonic()
            while self._refills and self._refills[0] <= now - REFILL_WINDOW:
                self._refills.popleft()
            if len(self._refills) >= REFILLS_MAX:
                self.tally.say_once("refills", f"fleet: {self.settings.redacted} lost decisions of this "
                                    f"host {REFILLS_MAX} times within {REFILL_WINDOW:.0f} s: sending them "
                                    "again at most that often (said once)")
                return False
            self._refills.append(now)
            held = self._owed_mark
        # Owed until the whole refill is in: one cut short (Redis gone again, a timeout) leaves
        # Redis holding a mark of the refill itself, which the next look would take as no loss.
        self._owing, self._owed_mark = True, held
        self._refill(link, held)
        self._owing, self._owed_mark = False, None
        return True

    def _refill(self, link: Link, held: bytes | None) -> None:
        """This host's active bans again, under the current seq (peers that saw them take them
        again, harmlessly); before them, the unblocks Redis lost (those after the mark it still
        holds, when it is of this epoch) taken out of the active set, so a host that joins does
        not load them. Those unblocks are not sent down the stream again: a peer that applied
        one and has banned the address since would lose its newer ban to a stale lift."""
        assert self.published is not None
        now, seq, host = self.clock(), self.published, self.settings.host_id
        mine = [ban for ban in self.bans.store.active(now) if ban.origin == ORIGIN_LOCAL]
        mark_held = parse_mark(held)
        cut = self._sent is not None and compare_marks(held, self._sent, self._tried) == "cut"
        if mark_held is not None and cut:
            seq = max(seq, mark_held[1])  # peers may have read its part: older bans are replays there
        if mark_held is not None and mark_held[0] == self.epoch and mark_held[1] < seq:
            active = {ban.address for ban in mine}
            after = mark_held[1]
            while after < seq and (changes := self.bans.store.changes(after=after, limit=PUBLISH_BATCH)):
                link.forget([change.address for change in changes
                             if change.id <= seq and change.kind == "lift" and change.origin == ORIGIN_LOCAL
                             and change.address not in active])
                after = changes[-1].id
        decisions = [Decision(host, self.epoch, seq, "ban", ban.address, reachable(ban.expires), now,
                              _reason(ban.reason)) for ban in mine]
        for start in range(0, len(decisions), PUBLISH_BATCH):
            link.publish(decisions[start:start + PUBLISH_BATCH])
        self._sent = mark(self.epoch, seq)
        link.set_mark(self._sent)
        self.tally.count("published", len(decisions))
        self._save(force=True)

    def publish_once(self, link: Link) -> bool:
        """Send what the feed has after the cursor; True when there may be more right away."""
        assert self.published is not None
        changes = self.bans.store.changes(after=self.published, limit=PUBLISH_BATCH)
        if not changes:
            return False
        decisions = [d for d in (self._decision(change) for change in changes) if d is not None]
        held = sent = self._sent
        if decisions:
            held, sent = self._send(link, decisions)
        self.published = changes[-1].id
        # At once: a cursor saved behind what peers saw would make a restart resend decisions
        # that they then refuse as replays.
        self._save(force=bool(decisions))
        self._check_sent(link, held, sent)
        return len(changes) == PUBLISH_BATCH

    def resend_bans(self, link: Link) -> None:
        """This host's active bans of the addresses a stale lift lifted elsewhere, under the current
        seq as a refill sends them; kept for the next round if Redis does not take them."""
        assert self.published is not None
        with self._lock:
            addresses = list(self._resend)
        if not addresses:
            return
        now, host, seq = self.clock(), self.settings.host_id, self.published
        decisions = [Decision(host, self.epoch, seq, "ban", ban.address, reachable(ban.expires), now,
                              _reason(ban.reason)) for ban in self.bans.store.get_many(addresses)
                     if ban.origin == ORIGIN_LOCAL and ban.active(now)]
        if decisions:
            self._check_sent(link, *self._send(link, decisions))
        with self._lock:
            self._resend.difference_update(addresses)

    def _send(self, link: Link, decisions: list[Decision]) -> tuple[bytes | None, bytes | None]:
        """Publish `decisions`: the mark Redis held before them, and the one it should have held."""
        self._tried = max(self._tried or (0, 0), (decisions[-1].epoch, decisions[-1].seq))
        held, sent = link.publish(decisions).before, self._sent
        self._sent = mark(decisions[-1].epoch, decisions[-1].seq)
        self.tally.count("published", len(decisions))
        return held, sent

    def _check_sent(self, link: Link, held: bytes | None, sent: bytes | None) -> None:
        if held != sent:
            latest, self._sent = self._sent, sent  # what Redis should have held before this publish
            if not self.check_mark(link, held, read=False):
                self._sent = latest

    def _decision(self, change: Change) -> Decision | None:
        if change.origin != ORIGIN_LOCAL or change.kind == "expire":
            return None  # peers' changes are theirs to send; expiry follows the ban everywhere
        if change.bans:
            # An admin's `block --duration 99999999w` is a valid ban here; as it stood, its
            # decision raised in every publish and nothing after it ever left this host.
            return Decision(self.settings.host_id, self.epoch, change.id, "ban", change.address,
                            reachable(change.expires), change.at, _reason(change.detail))
        return Decision(self.settings.host_id, self.epoch, change.id, "lift", change.address, None,
                        change.at, _reason(change.detail))


def _reason(text: str) -> str:
    return text.split(";", 1)[0][:100]

