"""Bans and lifts of one address take turns: a lock per address, held while a ban's record and
steps, or a lift's undo, run. Without it an unblock that came between a ban's record and its
steps lifted the record, and the steps then blocked the host with no ban on record to lift it.

Whoever holds a turn may run shell commands (KILL_ROUTE, KILL_ROUTE_UNDO) for up to
COMMAND_TIMEOUT, so the detection loop never waits for one, and threads that must keep going
(expiry, the settling of kernel bans, catching up on held records) ask with `wait=False` and
look again next round. Locks exist only while someone wants them: a million bans hold none.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from portsentry.bans.records import normalise
from portsentry.core.probe import IPAddress


class AddressTurns:
    def __init__(self) -> None:
        self._locks: dict[IPAddress, tuple[threading.Lock, int]] = {}  # lock, threads using it
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def turn(self, address: IPAddress, wait: bool = True) -> Iterator[bool]:
        """Hold `address` against other bans and lifts of it in this process; yields False (and
        holds nothing) when `wait` is False and it is busy."""
        key = normalise(address)
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        held = lock.acquire(blocking=wait)
        try:
            yield held
        finally:
            if held:
                lock.release()
            with self._guard:
                users = self._locks[key][1] - 1
                if users:
                    self._locks[key] = (lock, users)
                else:
                    del self._locks[key]
