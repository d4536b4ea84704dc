"""This host in the fleet: two threads, one publishing this host's bans and lifts, one applying
the others'.

Threads and ownership:
- fleet-publish owns the cursor into the ban store's change feed (`published`) and its Redis
  connection. It wakes when the ban lifecycle records a change (BanManager.on_change) and at
  least every POLL seconds (bans written by `portsentry block --file` straight to the store),
  sends the changes of origin "local" (bans, extensions, lifts; not expiries, which every host
  works out from the expiry it was given), and advances the cursor only once Redis took them:
  while Redis is away, the backlog waits in the store and goes out on reconnect. After a
  reconnect it also sends this host's active bans again, so a Redis that lost its data (a
  restart without persistence) is refilled.
- fleet-read owns the stream cursor, the Gate (replay order per host, rate cap) and its own
  Redis connection. It loads the fleet's active set when it has no cursor or fell behind what
  the stream keeps, then follows the stream with XREAD BLOCK, and applies what the Gate lets
  through by way of the ban lifecycle (bans.adopt).
- Both write the state file (STATE_DIR/fleet.json, fleet.state); the counters are read by
  `status` on the main loop under the node's lock.
Redis being down stops neither detection nor local bans: only these threads wait and retry.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from portsentry.bans.adopt import RemoteBan, adopt_bans, lift_remote
from portsentry.bans.lifecycle import BanManager
from portsentry.bans.store import ORIGIN_LOCAL, Change, StoreError
from portsentry.fleet.decision import BadDecision, Decision, decode, unpack
from portsentry.fleet.gate import ECHO, Gate, Guards
from portsentry.fleet.link import Link, describe_error, link_errors, trimmed_past
from portsentry.fleet.settings import FleetSettings
from portsentry.fleet.state import FleetCounters, FleetState, StateFile, load_state
from portsentry.journal.telemetry import Telemetry

POLL = 0.5  # seconds between looks at the change feed when nothing woke the publisher
PUBLISH_BATCH = 1000
READ_BATCH = 1000
BLOCK_MS = 1000
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0
PRUNE_EVERY = 30.0
SAVE_EVERY = 0.5  # seconds between state file writes; a crash re-sends or re-reads, harmlessly
LIVE_LOG_LIMIT = 20  # a batch with more bans than this is logged as one summary line

Logger = Callable[[str], None]
LinkFactory = Callable[[FleetSettings], Link]


class FleetNode:
    def __init__(self, settings: FleetSettings, bans: BanManager, state_dir: str, log: Logger,
                 telemetry: Telemetry | None = None, clock: Callable[[], float] = time.time,
                 link_factory: LinkFactory = Link, hosts_deny: str | None = None) -> None:
        self.settings = settings
        self.bans = bans
        self.log = log
        self.clock = clock
        self.telemetry = telemetry or Telemetry()
        self.hosts_deny = hosts_deny
        self._link_factory = link_factory
        self.path = os.path.join(state_dir, "fleet.json")
        self.gate = Gate(settings.host_id, settings.accept_hosts, settings.ban_rate_limit)
        self.counters = FleetCounters()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._saved_at = 0.0
        self._logged: set[str] = set()
        self._state_file = StateFile(self.path, settings.name)
        state, problem = load_state(self.path, settings.name)
        if problem is not None:
            self.log(f"fleet: {problem}")
        self.epoch: int = state.epoch or int(clock() * 1000)
        self.published: int | None = state.published
        self.stream: bytes | None = state.stream
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

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
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
            self._say_once("save", f"fleet: cannot write {self.path}: {error}")

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        with self._lock:
            c = self.counters
            backlog = None
            with contextlib.suppress(StoreError):
                if self.published is not None:
                    backlog = max(0, self.bans.store.last_change() - self.published)
            return {
                "name": self.settings.name, "host_id": self.settings.host_id, "redis": self.settings.redacted,
                "link": "up" if c.publish_up and c.read_up else "down",
                "down_since": c.down_since, "error": c.error, "published": c.published,
                "received": c.received, "applied": c.applied, "refused": dict(c.refused),
                "lag_ms": None if c.lag is None else round(c.lag * 1000, 1),
                "lag_max_ms": round(c.lag_max * 1000, 1), "backlog": backlog,
            }

    def _link_state(self, which: str, up: bool, error: BaseException | None = None) -> None:
        with self._lock:
            c = self.counters
            was = c.publish_up and c.read_up
            setattr(c, which, up)
            if up:
                if c.publish_up and c.read_up:
                    c.error = c.down_since = None
            else:
                c.error = describe_error(error)
                if c.down_since is None:
                    c.down_since = self.clock()
            now_up = c.publish_up and c.read_up
        self.telemetry.metrics.fleet_link(now_up)
        if was != now_up:
            self.log(f"fleet: link to {self.settings.redacted} is up" if now_up else
                     f"fleet: link to {self.settings.redacted} is down ({describe_error(error)}); "
                     "detection and local bans go on, changes are sent when it is back")

    def _say_once(self, key: str, text: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            self.log(text)

    def _backoff(self, delay: float) -> float:
        self._stop.wait(delay)
        return min(delay * 2, BACKOFF_MAX)

    # -- publishing ------------------------------------------------------------------------------

    def _publish_loop(self) -> None:
        delay = BACKOFF_FIRST
        link: Link | None = None
        next_prune = 0.0
        while not self._stop.is_set():
            try:
                if link is None:
                    link = self._link_factory(self.settings)
                    link.ping()
                    self._resend_active(link)
                    self._link_state("publish_up", True)
                    delay = BACKOFF_FIRST
                    next_prune = 0.0
                more = self.publish_once(link)
                if self.clock() >= next_prune:
                    next_prune = self.clock() + PRUNE_EVERY
                    link.prune(self.clock())
                if not more:
                    self._wake.wait(POLL)
                    self._wake.clear()
            except link_errors() as error:
                self._link_state("publish_up", False, error)
                if link is not None:
                    link.close()
                link = None
                delay = self._backoff(delay)
            except StoreError as error:
                self._say_once("store", f"fleet: cannot read the ban store: {error}")
                self._stop.wait(POLL)
            except Exception as error:  # a bug must not end publishing for the daemon's life
                self.log(f"adminalert: internal error in the fleet publisher: {error!r}")
                link = None
                delay = self._backoff(delay)
        if link is not None:
            link.close()

    def _resend_active(self, link: Link) -> None:
        """On (re)connect: where the feed cursor starts, and this host's active bans again."""
        store = self.bans.store
        last = store.last_change()
        if self.published is None or self.published > last:
            # First join, or a new ban store: its change ids start again, so a new epoch.
            if self.published is not None:
                self.epoch = int(self.clock() * 1000)
            self.published = last
        now = self.clock()
        mine = [ban for ban in store.active(now) if ban.origin == ORIGIN_LOCAL]
        seq = self.published
        for start in range(0, len(mine), PUBLISH_BATCH):
            link.publish([Decision(self.settings.host_id, self.epoch, seq, "ban", ban.address, ban.expires,
                                   now, _reason(ban.reason)) for ban in mine[start:start + PUBLISH_BATCH]])
        self._count("published", len(mine))
        self._save(force=True)

    def publish_once(self, link: Link) -> bool:
        """Send what the feed has after the cursor; True when there may be more right away."""
        assert self.published is not None
        changes = self.bans.store.changes(after=self.published, limit=PUBLISH_BATCH)
        if not changes:
            return False
        decisions = [d for d in (self._decision(change) for change in changes) if d is not None]
        if decisions:
            link.publish(decisions)
            self._count("published", len(decisions))
        self.published = changes[-1].id
        # At once: a cursor saved behind what peers saw would make a restart resend decisions
        # that they then refuse as replays.
        self._save(force=bool(decisions))
        return len(changes) == PUBLISH_BATCH

    def _decision(self, change: Change) -> Decision | None:
        if change.origin != ORIGIN_LOCAL or change.kind == "expire":
            return None  # peers' changes are theirs to send; expiry follows the ban everywhere
        if change.bans:
            return Decision(self.settings.host_id, self.epoch, change.id, "ban", change.address,
                            change.expires, change.at, _reason(change.detail))
        return Decision(self.settings.host_id, self.epoch, change.id, "lift", change.address, None,
                        change.at, _reason(change.detail))

    def _count(self, name: str, amount: int = 1) -> None:
        if amount <= 0:
            return
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + amount)
        self.telemetry.metrics.fleet_decisions(name, None, amount)

    def _refused(self, reason: str, decision: Decision | None, detail: str = "") -> None:
        with self._lock:
            self.counters.refused[reason] = self.counters.refused.get(reason, 0) + 1
        self.telemetry.metrics.fleet_decisions("refused", reason, 1)
        who = decision.host if decision is not None else "?"
        what = f"{decision.kind} of {decision.address}" if decision is not None else "an entry"
        self._say_once(f"{reason}:{who}", f"fleet: refused {what} from {who}: {reason}"
                       + (f" ({detail})" if detail else "") + " (said once per host and reason)")

    # -- reading ---------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        delay = BACKOFF_FIRST
        link: Link | None = None
        while not self._stop.is_set():
            try:
                if link is None:
                    link = self._link_factory(self.settings)
                    link.ping()
                    self._catch_up(link)
                    self._link_state("read_up", True)
                    delay = BACKOFF_FIRST
                assert self.stream is not None
                entries = link.read(self.stream, BLOCK_MS, READ_BATCH)
                if entries:
                    self.apply_entries(entries)
                    self.stream = entries[-1][0]
                    self._commit_read()
                self._save(force=not entries)
            except link_errors() as error:
                self._link_state("read_up", False, error)
                if link is not None:
                    link.close()
                link = None
                delay = self._backoff(delay)
            except StoreError as error:
                self._say_once("store", f"fleet: cannot write the ban store: {error}")
                self._stop.wait(POLL)
            except Exception as error:
                self.log(f"adminalert: internal error in the fleet reader: {error!r}")
                link = None
                delay = self._backoff(delay)
        if link is not None:
            link.close()

    def _catch_up(self, link: Link) -> None:
        """With no cursor, or one older than the stream's oldest entry: the fleet's active set,
        then the stream from where it stood before the set was read (what comes twice is harmless)."""
        first = link.first_id()
        if self.stream is not None and (first is None or not trimmed_past(first, self.stream)):
            return
        last = link.last_id()
        started, total = time.monotonic(), 0
        values: list[bytes] = []
        for batch in link.active():
            total += len(batch)
            values += batch
        # All at once: the kernel takes every ban in one batch before the store records them.
        applied = self.apply_active(values)
        self.stream = last
        self._commit_read()
        self._save(force=True)
        self.log(f"fleet: loaded the fleet's active set: {applied} of {total} bans applied here in "
                 f"{time.monotonic() - started:.1f} s")

    def _commit_read(self) -> None:
        with self._lock:
            self._read_state = (self.stream, dict(self.gate.seen))

    def apply_active(self, values: list[bytes]) -> int:
        """Signed decisions of the active set: verified and guarded like stream entries, except
        the rate cap (this is state the fleet already holds, not news). How many were made here."""
        now = self.clock()
        wanted: list[RemoteBan] = []
        for value in values:
            try:
                decision = unpack(value, self.settings.key, self.settings.name)
            except BadDecision as error:
                self._refused(error.reason, None, str(error))
                continue
            if decision.kind != "ban":
                continue
            verdict = self.gate.check(decision, now, live=False)
            if verdict == ECHO:
                continue
            if verdict is not None:
                self._refused(verdict, decision)
                continue
            wanted.append(RemoteBan(decision.address, decision.expires, decision.host,
                                    _fleet_reason(decision)))
        made = adopt_bans(self.bans, wanted, now, self.hosts_deny, kernel_first=True)
        self._count("applied", len(made))
        return len(made)

    def apply_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Stream entries in order: runs of bans in one batch, lifts one by one between them. If
        applying fails (the store busy or full), the entries are read again, so the replay order
        taken from them is put back: the second reading must not look like a replay."""
        seen = dict(self.gate.seen)
        try:
            self._apply_entries(entries)
        except BaseException:
            self.gate.seen = seen
            raise

    def _apply_entries(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        now = self.clock()
        run: list[tuple[Decision, RemoteBan]] = []
        for _entry_id, fields in entries:
            try:
                decision = decode(fields, self.settings.key, self.settings.name)
            except BadDecision as error:
                self._count("received")
                self._refused(error.reason, None, str(error))
                continue
            verdict = self.gate.check(decision, now)
            if verdict == ECHO:
                continue
            self._count("received")
            if verdict is not None:
                self._refused(verdict, decision)
                continue
            if decision.kind == "ban":
                run.append((decision, RemoteBan(decision.address, decision.expires, decision.host,
                                                _fleet_reason(decision))))
                continue
            self._apply_bans(run, now)
            run = []
            if lift_remote(self.bans, decision.address, decision.host, now):
                self._count("applied")
        self._apply_bans(run, now)

    def _apply_bans(self, run: list[tuple[Decision, RemoteBan]], now: float) -> None:
        if not run:
            return
        made = adopt_bans(self.bans, [ban for _d, ban in run], now, self.hosts_deny)
        done = self.clock()
        self._count("applied", len(made))
        if made:
            lag = max(0.0, done - max(d.at for d, _b in run))
            with self._lock:
                self.counters.lag = lag
                self.counters.lag_max = max(self.counters.lag_max, lag)
            self.telemetry.metrics.fleet_lag(lag)
        origins = {ban.address: ban.origin for _d, ban in run}
        if len(made) <= LIVE_LOG_LIMIT:
            for ban in made:
                self.log(f"attackalert: Host {ban.address} has been blocked via fleet "
                         f"(from {origins.get(ban.address, '?')})")
        else:
            self.log(f"attackalert: {len(made)} hosts have been blocked via fleet")


def _reason(text: str) -> str:
    return text.split(";", 1)[0][:100]


def _fleet_reason(decision: Decision) -> str:
    return f"fleet: {decision.reason or 'ban'}"[:120]
