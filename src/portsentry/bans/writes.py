"""Every change to a ban row: made or extended (`ban`, `ban_many`, `ban_absent`), lifted or
expired (`lift`, `lift_many`), and KILL_ROUTE's mark dropped (`unmark_routed`), each in one
transaction that writes its history row too. A lift moves the count of bans to `offenders`, so
escalation outlives the ban; `lifted_here` remembers the fleet bans an admin lifted on this host
only. Part of BanStore (bans.store), on its one connection (bans.connection).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import replace
from ipaddress import ip_address

from portsentry.bans.connection import (
    BAN_COLUMNS,
    CHUNK,
    HISTORY_INSERT,
    StoreConnection,
    describe_expiry,
    store_errors,
)
from portsentry.bans.records import (
    ORIGIN_LOCAL,
    ORIGIN_LOCAL_ONLY,
    POLICY,
    ROUTE_MARK,
    Ban,
    BanRequest,
    EventKind,
    normalise,
)
from portsentry.core.probe import IPAddress


class BanWrites(StoreConnection):
    """The writes to `bans` (and the `offenders` and `lifted_here` rows that go with them)."""

    @store_errors
    def ban(
        self,
        address: IPAddress | str,
        *,
        reason: str,
        mode: str,
        port: int,
        now: float,
        duration: float | None,
        hosts_deny_line: str | None = None,
        backends: Iterable[str] = (),
        origin: str = ORIGIN_LOCAL,
    ) -> Ban:
        """Ban `address` for `duration` seconds (None = forever), or extend its active ban.

        Extending counts the hit, moves last_seen and keeps the later expiry; reason, mode and
        port become the latest ones. A ban still in the table but expired counts as over: this
        is then a new offence.
        """
        request = BanRequest(normalise(address), reason, mode, port, duration, hosts_deny_line,
                             tuple(backends))
        with self._transaction() as db:
            return self._ban(db, request, now, origin)

    @store_errors
    def set_end(self, address: IPAddress | str, expires: float | None, now: float,
                origin: str = ORIGIN_LOCAL) -> Ban | None:
        """Give the ban of `address` in force the end `expires` (None: forever), and nothing
        else: its reason, mode, port, count of blocks and lines stay (an admin's `block --for`
        of a banned address is no new block). Recorded as an "extend"; None, with nothing
        written, when no ban of `address` is in force."""
        key = str(normalise(address))
        with self._transaction() as db:
            old = self._get(db, key)
            if old is None or not old.active(now):
                return None
            ban = replace(old, expires=expires, origin=origin if expires != old.expires else old.origin)
            db.execute("UPDATE bans SET expires = ?, origin = ? WHERE address = ?",
                       (ban.expires, ban.origin, key))
            self._record(db, "extend", key, f"{ban.mode} port {ban.port}: {ban.reason}; "
                         f"{describe_expiry(ban.expires)}", now, origin=origin, expires=ban.expires)
        return ban

    @store_errors
    def ban_many(self, requests: Iterable[BanRequest], now: float, origin: str = ORIGIN_LOCAL,
                 policy: Callable[[int], float | None] | None = None) -> list[Ban]:
        """`ban` for many addresses in one transaction (`portsentry block --file`). A request
        whose duration is POLICY lasts `policy(earlier offences)` seconds (None: forever)."""
        with self._transaction() as db:
            return [self._ban(db, request, now, origin, policy) for request in requests]

    @store_errors
    def ban_absent(self, requests: Iterable[BanRequest], now: float, origin: str,
                   keep_longer: bool = False) -> list[Ban]:
        """`ban_many` for addresses with no row in `bans` (a fleet host joining takes 100,000 at
        once): rows and history in bulk, five times faster than one `_ban` each. A request whose
        address has a row goes the ordinary way, in the same transaction; with `keep_longer`, not
        at all when that row's ban is in force and lasts at least as long (a fleet decision heard
        twice changes nothing)."""
        wanted = [(str(address), address, r) for r in requests for address in (normalise(r.address),)]
        made: list[Ban] = []
        texts: dict[object, str] = {}  # backends and expiries repeat: each is written once
        with self._transaction() as db:
            present: dict[str, float | None] = {}
            past: dict[str, int] = {}
            for start in range(0, len(wanted), CHUNK):
                keys = [key for key, _a, _r in wanted[start:start + CHUNK]]
                marks = ",".join("?" * len(keys))
                present.update(db.execute(
                    f"SELECT address, expires FROM bans WHERE address IN ({marks})", keys).fetchall())
                past.update(db.execute(
                    f"SELECT address, offences FROM offenders WHERE address IN ({marks})", keys).fetchall())
            rows, history = [], []
            for key, address, request in wanted:
                if key in present or isinstance(request.duration, str):
                    if keep_longer and key in present and _holds(present[key], request.duration, now):
                        continue
                    made.append(self._ban(db, request, now, origin))
                    continue
                if request.duration is not None and not request.duration > 0:
                    raise ValueError(f"ban duration must be positive seconds or None, not "
                                     f"{request.duration!r}")
                expires = None if request.duration is None else now + request.duration
                backends = tuple(dict.fromkeys(request.backends))
                ban = Ban(address, request.reason, request.mode, request.port, now, now, 1, expires,
                          past.get(key, 0) + 1, request.hosts_deny_line, backends, origin)
                present[key] = expires
                made.append(ban)
                if (backends_text := texts.get(backends)) is None:
                    backends_text = texts[backends] = json.dumps(list(backends))
                if (until := texts.get(expires)) is None:
                    until = texts[expires] = describe_expiry(expires)
                rows.append((key, ban.reason, ban.mode, ban.port, now, now, 1, expires, ban.offences,
                             ban.hosts_deny_line, backends_text, origin))
                history.append((now, "ban", key, f"{ban.mode} port {ban.port}: {ban.reason}; {until}; "
                                f"offence {ban.offences}", origin, expires, self._reported))
            db.executemany(f"INSERT INTO bans ({BAN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           rows)
            db.executemany(HISTORY_INSERT, history)
        return made

    def _ban(self, db: sqlite3.Connection, request: BanRequest, now: float, origin: str,
             policy: Callable[[int], float | None] | None = None) -> Ban:
        addr = normalise(request.address)
        key = str(addr)
        old = self._get(db, key)
        past: int | None = None  # offences before this ban, looked up at most once
        duration: float | None
        if isinstance(request.duration, str):
            if request.duration != POLICY or policy is None:
                raise ValueError(f"ban duration {request.duration!r} needs POLICY and a policy")
            past = self._past_offences(db, key)
            earlier = past if old is None or old.active(now) else max(past, old.offences)
            duration = policy(earlier)
        else:
            duration = request.duration
        if duration is not None and not duration > 0:
            raise ValueError(f"ban duration must be positive seconds or None (forever), not {duration!r}")
        new_expires = None if duration is None else now + duration
        if old is not None and old.active(now):
            expires = None if old.expires is None or new_expires is None else max(old.expires, new_expires)
            ban = Ban(
                address=addr,
                reason=request.reason,
                mode=request.mode,
                port=request.port,
                first_seen=old.first_seen,
                last_seen=now,
                count=old.count + 1,
                expires=expires,
                offences=old.offences,
                hosts_deny_line=request.hosts_deny_line if request.hosts_deny_line is not None
                else old.hosts_deny_line,
                backends=tuple(dict.fromkeys((*old.backends, *request.backends))),
                # The longer ban holds, and with it who made it.
                origin=origin if expires != old.expires else old.origin,
            )
            kind: EventKind = "extend"
        else:
            if old is not None:
                self._retire(db, old, now, "expire", "expired before the next ban")
            ban = Ban(
                address=addr,
                reason=request.reason,
                mode=request.mode,
                port=request.port,
                first_seen=now,
                last_seen=now,
                count=1,
                expires=new_expires,
                offences=(past if past is not None and old is None else self._past_offences(db, key)) + 1,
                hosts_deny_line=request.hosts_deny_line,
                backends=tuple(dict.fromkeys(request.backends)),
                origin=origin,
            )
            kind = "ban"
        db.execute(
            f"INSERT OR REPLACE INTO bans ({BAN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, ban.reason, ban.mode, ban.port, ban.first_seen, ban.last_seen, ban.count, ban.expires,
             ban.offences, ban.hosts_deny_line, json.dumps(list(ban.backends)), ban.origin),
        )
        detail = f"{ban.mode} port {ban.port}: {ban.reason}; {describe_expiry(ban.expires)}"
        if kind == "ban":
            detail += f"; offence {ban.offences}"
        self._record(db, kind, key, detail, now, origin=origin, expires=ban.expires)
        return ban

    @store_errors
    def lift(self, address: IPAddress | str, now: float, reason: str,
             origin: str = ORIGIN_LOCAL, expired_only: bool = False) -> Ban | None:
        """End the ban of `address` (kept as an offence); the lifted ban, or None if there was none.

        Recorded as "expire" when the ban had run out by `now`, else as "lift". With
        `expired_only`, a ban still in force at `now` stays (made again or extended since the
        caller saw it expired).
        """
        with self._transaction() as db:
            key = normalise(address)
            if origin not in (ORIGIN_LOCAL, ORIGIN_LOCAL_ONLY):
                # The peer lifted its ban: a ban it sends from now on is a new one.
                db.execute("DELETE FROM lifted_here WHERE address = ? AND origin = ?", (str(key), origin))
            old = self._lift(db, key, now, reason, origin, expired_only)
            if old is not None and origin == ORIGIN_LOCAL_ONLY:
                self._lifted_here(db, [(str(key), old.origin, old.expires)], now)
            return old

    @store_errors
    def lift_many(self, addresses: Iterable[IPAddress], now: float, reason: str,
                  origin: str = ORIGIN_LOCAL) -> int:
        """`lift` for many addresses in one transaction; how many had a ban. Rows are read and
        written in chunks, as text: parsing 100,000 addresses back costs more than the SQL."""
        keys = list(dict.fromkeys(str(normalise(a)) for a in addresses))
        lifted = 0
        with self._transaction() as db:
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start:start + CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT address, offences, expires, origin FROM bans WHERE address IN ({marks})",
                    chunk).fetchall()
                if origin == ORIGIN_LOCAL_ONLY:
                    self._lifted_here(db, [(key, was, expires) for key, _o, expires, was in rows], now)
                db.executemany("DELETE FROM bans WHERE address = ?", ((key,) for key, _o, _e, _w in rows))
                db.executemany(
                    "INSERT INTO offenders (address, offences, last_lifted) VALUES (?, ?, ?) "
                    "ON CONFLICT (address) DO UPDATE SET "
                    "offences = max(offences, excluded.offences), last_lifted = excluded.last_lifted",
                    ((key, offences, now) for key, offences, _e, _w in rows))
                db.executemany(HISTORY_INSERT, (
                    (now, "lift" if expires is None or expires > now else "expire", key, reason, origin, None,
                     self._reported) for key, _o, expires, _w in rows))
                lifted += len(rows)
        return lifted

    @staticmethod
    def _lifted_here(db: sqlite3.Connection, rows: Iterable[tuple[str, str, float | None]],
                     now: float) -> None:
        """Remember the fleet bans among `rows` (address, origin, expiry) that an admin lifted here
        only: a peer sends its active bans again after Redis lost data, and those must not come
        back (fleet.apply asks `lifted_here`). This host's own bans are not remembered: peers'
        copies of them are echoes, never applied here."""
        db.executemany(
            "INSERT INTO lifted_here (address, origin, expires, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET origin = excluded.origin, expires = excluded.expires, "
            "at = excluded.at",
            ((key, origin, expires, now) for key, origin, expires in rows
             if origin not in (ORIGIN_LOCAL, ORIGIN_LOCAL_ONLY)))

    def lifted_here(self, addresses: Iterable[IPAddress]) -> dict[IPAddress, tuple[str, float | None]]:
        """For those of `addresses` whose fleet ban an admin lifted here only: (origin, expiry)."""
        found: dict[IPAddress, tuple[str, float | None]] = {}
        with self._lock:
            # Nearly always empty: a joining host's 100,000 bans then cost one query, not 100,000.
            if self._db.execute("SELECT 1 FROM lifted_here LIMIT 1").fetchone() is None:
                return found
            keys = list(dict.fromkeys(str(normalise(a)) for a in addresses))
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start:start + CHUNK]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT address, origin, expires FROM lifted_here WHERE address IN ({marks})"
                for address, origin, expires in self._db.execute(query, chunk):
                    found[ip_address(address)] = (origin, expires)
        return found

    def _lift(self, db: sqlite3.Connection, address: IPAddress, now: float, reason: str,
              origin: str, expired_only: bool = False) -> Ban | None:
        old = self._get(db, str(address))
        if old is None or (expired_only and old.active(now)):
            return None
        self._retire(db, old, now, "lift" if old.active(now) else "expire", reason, origin)
        return old

    @store_errors
    def mark_routed(self, address: IPAddress) -> bool:
        """KILL_ROUTE is about to run for this ban, recorded apart from it (a kernel ban recorded
        late): ROUTE_MARK added, before the command, as a ban made here records it. False when
        the ban is gone."""
        with self._transaction() as db:
            key = str(normalise(address))
            ban = self._get(db, key)
            if ban is None:
                return False
            if ROUTE_MARK not in ban.backends:
                db.execute("UPDATE bans SET backends = ? WHERE address = ?",
                           (json.dumps([*ban.backends, ROUTE_MARK]), key))
            return True

    @store_errors
    def unmark_routed(self, addresses: Iterable[IPAddress]) -> None:
        """KILL_ROUTE failed for these bans, and no earlier KILL_ROUTE holds them: ROUTE_MARK is
        dropped (it was recorded before the command ran), so nothing lists the ban as held by it,
        and neither KILL_ROUTE_UNDO nor the re-run after a reboot is done for a route that was
        never made (or that someone else, such as 1.2, made: its "File exists")."""
        with self._transaction() as db:
            for address in addresses:
                key = str(normalise(address))
                ban = self._get(db, key)
                if ban is not None and ROUTE_MARK in ban.backends:
                    kept = [name for name in ban.backends if name != ROUTE_MARK]
                    db.execute("UPDATE bans SET backends = ? WHERE address = ?", (json.dumps(kept), key))

    def _retire(self, db: sqlite3.Connection, old: Ban, now: float, kind: EventKind, reason: str,
                origin: str = ORIGIN_LOCAL) -> None:
        key = str(old.address)
        db.execute("DELETE FROM bans WHERE address = ?", (key,))
        db.execute(
            "INSERT INTO offenders (address, offences, last_lifted) VALUES (?, ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET "
            "offences = max(offences, excluded.offences), last_lifted = excluded.last_lifted",
            (key, old.offences, now),
        )
        self._record(db, kind, key, reason, now, origin=origin)


def _holds(expires: float | None, duration: float | str | None, now: float) -> bool:
    """Whether a ban until `expires` is in force at `now` and lasts at least `duration` more."""
    if expires is not None and expires <= now:
        return False
    if expires is None or duration is None:
        return expires is None
    return isinstance(duration, float | int) and expires >= now + duration
