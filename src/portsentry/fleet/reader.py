"""fleet-read, FleetNode's reader (a part of FleetNode; fleet.node starts its thread): the loop
that connects, catches up and retries with a backoff, one turn of reading what follows the
stream cursor and applying what the Gate lets through (fleet.apply), and the load of the fleet's
active set when there is no cursor or what followed it is gone. All of it runs on fleet-read,
which owns the stream cursor (`stream`, `_past`), the Gate and its own Redis connection; the
cursor and the replay order the publisher saves (`_read_state`) change together, under the
node's lock.
"""

from __future__ import annotations

import time

from portsentry.bans.store import StoreError
from portsentry.fleet.cursor import just_before, lost_past, stream_order
from portsentry.fleet.link import Link, link_errors
from portsentry.fleet.node_state import BACKOFF_FIRST, BLOCK_MS, POLL, NodeState

READ_BATCH = 1000


class Reading(NodeState):
    """FleetNode's reader: everything fleet-read runs."""

    def _read_loop(self) -> None:
        delay = BACKOFF_FIRST
        link: Link | None = None
        fresh = False
        while not self._stop.is_set():
            try:
                if link is None:
                    link = self._connect("read")
                    link.ping()
                    self._catch_up(link)
                    fresh = True
                self.read_once(link, 0 if fresh else BLOCK_MS)  # the first without waiting for news
                if fresh:  # as the publisher: up once a read went through
                    self.tally.link("read_up", True)
                    delay, fresh = BACKOFF_FIRST, False
            except link_errors() as error:
                delay = self._link_lost(link, "read_up", error, delay)
                link = None
            except StoreError as error:
                self.tally.say_once("store", f"fleet: cannot write the ban store: {error}")
                self._stop.wait(POLL)
            except Exception as error:
                if self._stop.is_set():
                    break  # the stop cut a command short (Link.interrupt)
                self.log(f"adminalert: internal error in the fleet reader: {error!r}")
                link = None
                delay = self._backoff(delay)
        if link is not None:
            link.close()

    def read_once(self, link: Link, block_ms: int = BLOCK_MS) -> int:
        """One turn of the reader: what follows the cursor, applied; or, when entries after it
        are gone, the active set first. How many entries were read."""
        assert self.stream is not None
        first, newest, entries = link.follow(self.stream, block_ms, READ_BATCH)
        if lost_past(first, self.stream, newest):
            self._load_active(link, first)  # these entries are read again, after the set
            return len(entries)
        if entries:
            until = None if self._past is None else stream_order(self._past)
            past = 0 if until is None else sum(stream_order(entry_id) <= until for entry_id, _f in entries)
            self.applier.apply_entries(entries, past)
            if until is not None and stream_order(entries[-1][0]) >= until:
                self._past = None  # read up to where the set was loaded: from here on, news
            self.stream = entries[-1][0]
            self._commit_read()
        self._save(force=not entries)
        return len(entries)

    def _catch_up(self, link: Link) -> None:
        first, newest = link.ends()
        if lost_past(first, self.stream, newest):
            self._load_active(link, first)

    def _load_active(self, link: Link, first: bytes | None) -> None:
        """The fleet's active set, then the stream: with no cursor, from where it stood before the
        set was read; when what followed the cursor is gone, from the oldest entry left, so the
        lifts that survived are applied after the set (what comes twice is harmless)."""
        why = "" if self.stream is None else " (what followed this host's cursor is gone from the stream)"
        newest = link.last_id()
        resume = self.stream is not None and first is not None
        last = just_before(first) if resume and first is not None else newest
        self._past = newest if resume else None
        started = time.monotonic()
        # All at once: the kernel takes every ban in one batch before the store records them.
        applied, total = self.applier.apply_active(link.active())
        self.stream = last
        self._commit_read()
        self._save(force=True)
        self.log(f"fleet: loaded the fleet's active set: {applied} of {total} bans applied here in "
                 f"{time.monotonic() - started:.1f} s{why}")

    def _commit_read(self) -> None:
        with self._lock:
            self._read_state = (self.stream, dict(self.gate.seen))
