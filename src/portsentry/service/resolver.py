"""Reverse DNS for RESOLVE_HOST=1, bounded in time and never trusted.

A PTR record is attacker-controlled text: a name that is not a plain DNS host name, or that reads
as an address, is replaced by the address, and names only ever reach log lines, never a command
($TARGET$ is always the address).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from portsentry.core.probe import IPAddress

# fullmatch, not match with "$": "$" also matches before a final newline, which let
# "evil.example\n" through into log lines.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
# A name that reads as another address would accuse that address: fail2ban's `Host: <HOST>`
# filter (the one portsentry's 1.2.x branch ships) takes a dotted quad at the start of the name
# field whatever follows it, and inet_aton-style parsers read 2130706433, 127.1 or 0x7f.1 as
# 127.0.0.1. No real host name does either: its top label is never numeric (RFC 1123 2.1).
_LEADING_QUAD = re.compile(r"(?:[0-9]{1,3}\.){3}[0-9]{1,3}")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")


def safe_name(name: str, address: IPAddress) -> str:
    if (not _HOSTNAME.fullmatch(name) or _LEADING_QUAD.match(name)
            or _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2])):
        return str(address)
    return name


def _getnameinfo(address: str) -> str:
    return socket.getnameinfo((address, 0), socket.NI_NAMEREQD)[0]


class Resolver:
    """Reverse lookups off the detection loop, cached, bounded in time and in number.

    Threads and ownership: `lookup` is called by the main loop; the lookups run on the
    `resolve` threads, and `done` is called on one of those (or on a timer thread at the
    deadline), exactly once per lookup. The cache is guarded by a lock.
    """

    def __init__(self, timeout: float = 1.0, capacity: int = 4096, pending: int = 256,
                 ptr: Callable[[str], str] | None = None) -> None:
        self._ptr = ptr or _getnameinfo
        self.timeout = timeout
        self.capacity = capacity
        self.max_pending = pending
        self.full = 0  # lookups not started because `pending` queries were queued or running
        self._cache: dict[IPAddress, str] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resolve")

    def cached(self, address: IPAddress) -> str | None:
        with self._lock:
            return self._cache.get(address)

    def lookup(self, address: IPAddress, done: Callable[[str], None]) -> str | None:
        """The name at once when it is cached (or the address when too many lookups are under
        way); otherwise None, and `done(name)` is called once the name is known or `timeout`
        has passed (then with the address; a late answer still fills the cache)."""
        with self._lock:
            cached = self._cache.get(address)
            if cached is not None:
                return cached
            if self._pending >= self.max_pending:
                self.full += 1
                return str(address)
            self._pending += 1
        once = threading.Lock()

        def finish(name: str) -> None:
            if once.acquire(blocking=False):
                done(name)

        timer = threading.Timer(self.timeout, finish, (str(address),))
        timer.daemon = True
        timer.start()

        def resolve() -> None:
            try:
                name = safe_name(self._ptr(str(address)), address)
            except (OSError, UnicodeError):  # a name whose bytes are not UTF-8 raises the second
                name = str(address)
            finally:
                # Counted until the query itself ends, not until the caller's deadline: with a
                # name server that never answers, each deadline let one more query into the
                # workers' queue, which then grew for as long as new sources came.
                with self._lock:
                    self._pending -= 1
            with self._lock:
                if len(self._cache) >= self.capacity:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[address] = name
            timer.cancel()
            finish(name)

        self._pool.submit(resolve)
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
