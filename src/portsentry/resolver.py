"""Reverse DNS for RESOLVE_HOST=1, bounded in time and never trusted.

A PTR record is attacker-controlled text: a name that is not a plain DNS host name is replaced by
the address, and names only ever reach log lines, never a command ($TARGET$ is always the address).
"""

from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from .probe import IPAddress

# fullmatch, not match with "$": "$" also matches before a final newline, which let
# "evil.example\n" through into log lines.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")


def safe_name(name: str, address: IPAddress) -> str:
    return name if _HOSTNAME.fullmatch(name) else str(address)


class Resolver:
    """Caches names; a lookup that takes longer than `timeout` yields the address itself."""

    def __init__(self, timeout: float = 1.0, capacity: int = 4096) -> None:
        self.timeout = timeout
        self.capacity = capacity
        self._cache: dict[IPAddress, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="resolve")

    def name(self, address: IPAddress) -> str:
        cached = self._cache.get(address)
        if cached is not None:
            return cached
        future = self._pool.submit(socket.getnameinfo, (str(address), 0), socket.NI_NAMEREQD)
        try:
            host, _port = future.result(timeout=self.timeout)
            name = safe_name(host, address)
        except (FutureTimeout, OSError):
            name = str(address)
        if len(self._cache) >= self.capacity:
            self._cache.pop(next(iter(self._cache)))
        self._cache[address] = name
        return name

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
