"""The hosts.deny lines the ban store knows to be ours: `bans.hosts_deny_line` is the line a ban
wants, and `written_lines` the copies we appended ourselves (one row per line and address), so
lifting, restore and `hosts-deny tidy` touch only those; an identical line the admin or fail2ban
wrote first is theirs. Part of BanStore (bans.store), on its one connection (bans.connection).
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import ip_address

from portsentry.bans.connection import ACTIVE, CHUNK, StoreConnection, store_errors
from portsentry.bans.records import normalise
from portsentry.core.probe import IPAddress


class OwnedLines(StoreConnection):
    """The `written_lines` table: which hosts.deny copies we appended, for which address."""

    @store_errors
    def own_line(self, address: IPAddress | str, line: str, now: float) -> None:
        """We are about to append `line` to hosts.deny for `address`: from now on that copy is ours.

        Called under the hosts.deny lock after the file was found not to hold the line, and
        before the append, so a crash between the two leaves a record of a line that is not
        there (restore appends it), never a line of ours nobody knows of. A line that was
        already in the file is someone else's and is never recorded.
        """
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO written_lines (line, address, written_at) VALUES (?, ?, ?)",
                (line, str(normalise(address)), now),
            )

    @store_errors
    def own_lines(self, owned: Iterable[tuple[IPAddress, str]], now: float) -> None:
        """`own_line` for many (address, line) pairs in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO written_lines (line, address, written_at) VALUES (?, ?, ?)",
                ((line, str(normalise(address)), now) for address, line in owned),
            )

    @store_errors
    def owns_line(self, address: IPAddress | str, line: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM written_lines WHERE line = ? AND address = ?",
                                   (line, str(normalise(address)))).fetchone()
        return row is not None

    @store_errors
    def owned_of(self, addresses: Iterable[IPAddress]) -> list[tuple[IPAddress, str]]:
        """(address, line) for the hosts.deny copies we appended for any of `addresses`."""
        keys = [str(normalise(a)) for a in addresses]
        found: list[tuple[IPAddress, str]] = []
        with self._lock:
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start:start + CHUNK]
                marks = ",".join("?" * len(chunk))
                found += [(ip_address(address), line) for address, line in self._db.execute(
                    f"SELECT address, line FROM written_lines WHERE address IN ({marks})", chunk)]
        return found

    @store_errors
    def disown_lines(self, owned: Iterable[tuple[IPAddress, str]]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM written_lines WHERE line = ? AND address = ?",
                           ((line, str(normalise(address))) for address, line in owned))

    @store_errors
    def disown_line(self, address: IPAddress | str, line: str) -> None:
        """Our copy of `line` was removed from hosts.deny."""
        with self._transaction() as db:
            db.execute("DELETE FROM written_lines WHERE line = ? AND address = ?",
                       (line, str(normalise(address))))

    @store_errors
    def owned_lines(self, now: float) -> tuple[dict[str, int], dict[str, int]]:
        """The hosts.deny lines we appended and have not removed yet, as copies per line text:
        (those whose address is banned at `now`, those whose ban is over)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT w.line, EXISTS (SELECT 1 FROM bans b WHERE b.address = w.address "
                f"AND {ACTIVE}) FROM written_lines w",
                (now,),
            ).fetchall()
        active: dict[str, int] = {}
        stale: dict[str, int] = {}
        for line, is_active in rows:
            counts = active if is_active else stale
            counts[line] = counts.get(line, 0) + 1
        return active, stale

    @store_errors
    def stale_lines(self, now: float) -> set[str]:
        """hosts.deny lines of ours whose ban is over (lifting failed to remove them)."""
        return set(self.owned_lines(now)[1])

    @store_errors
    def forget_lines(self, lines: Iterable[str], now: float) -> None:
        """Stop tracking our copies of `lines` (tidy removed them), except for addresses banned
        again meanwhile."""
        with self._transaction() as db:
            for line in lines:
                db.execute(
                    "DELETE FROM written_lines WHERE line = ? AND address NOT IN "
                    f"(SELECT address FROM bans WHERE {ACTIVE})",
                    (line, now),
                )
