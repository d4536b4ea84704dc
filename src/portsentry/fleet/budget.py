"""The reply budget of a fleet connection (fleet.bounded says why): every reply has one
(MAX_REPLY, each element and bulk string counted with an overhead), and a larger one is refused
as its header is read, before anything is allocated for it, and the connection dropped
(`ReplyTooLarge`). The one read that cannot go through a script, the XREAD BLOCK that waits for
news, takes its answer only as "news came" (`at_most` MAX_WAKE); a reply past the budget says the
same. Needs redis-py: fleet.link imports it only when it connects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.connection
from redis._parsers import _RESP2Parser, _RESP3Parser
from redis._parsers.socket import SocketBuffer
from redis.exceptions import InvalidResponse

# The protocol a connection speaks when its URL names none: 2 up to redis-py 5, 3 from 6 on.
_DEFAULT_PROTOCOL = str(getattr(redis.connection, "DEFAULT_RESP_VERSION", 2))
# Far above any legitimate reply (a batch of 10,000 active bans is at most 11 MB counted this
# way), far below what would hurt a host: the Python objects of a reply take a few times this.
MAX_REPLY = 32 * 2**20
# The blocking read's: one entry, in its bounded form well under a kilobyte.
MAX_WAKE = 64 * 2**10
ELEMENT = 64  # what one element costs beyond its bytes (a Python object, a list slot)
_SIZED = frozenset(bytes([kind]) for kind in b"$*%~>=|!")
_PAIRS = frozenset((b"%", b"|"))  # maps and attributes: two elements per count
_BYTES = frozenset((b"$", b"=", b"!"))  # bulk strings, verbatim strings, bulk errors


class ReplyTooLarge(InvalidResponse):
    """A reply past its budget: refused unread, and its connection dropped."""


_budget = threading.local()  # each fleet thread has its own connection


@contextmanager
def at_most(limit: int) -> Iterator[None]:
    """Replies read by this thread within the block have `limit` (bytes, counted as above)."""
    _budget.limit = limit
    try:
        yield
    finally:
        del _budget.limit


class _Budget(SocketBuffer):
    """The socket buffer of a fleet connection, counting what the reply being read costs."""

    spent = 0
    limit = MAX_REPLY

    def readline(self, *args: Any, **kwargs: Any) -> bytes:  # redis-py 5 takes no timeout
        line: bytes = super().readline(*args, **kwargs)
        kind = line[:1]
        if kind in _SIZED:
            body = line[1:]
            count = int(body) if body.isdigit() and len(body) < 20 else 0  # -1 (null) and junk: 0
            if kind in _BYTES:
                self.spent += ELEMENT + count
            else:
                self.spent += ELEMENT * count * (2 if kind in _PAIRS else 1)
            if self.spent > self.limit:
                raise ReplyTooLarge(f"a reply of more than {self.limit} bytes refused")
        return line


class _Bounded:
    """Swaps the parser's socket buffer for a _Budget, and starts each reply's count afresh."""

    _buffer: Any
    _sock: Any

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[misc]
        buffer = _Budget(self._sock, self._buffer.socket_read_size, connection.socket_timeout)
        self._buffer.close()
        self._buffer = buffer

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._buffer is not None:
            self._buffer.spent = 0
            self._buffer.limit = getattr(_budget, "limit", MAX_REPLY)
        return super().read_response(*args, **kwargs)  # type: ignore[misc]


class BoundedRESP2(_Bounded, _RESP2Parser):
    pass


class BoundedRESP3(_Bounded, _RESP3Parser):
    pass


def bound(client: redis.Redis) -> redis.Redis:
    """`client`, its connections made from now on reading every reply within MAX_REPLY."""
    options = client.connection_pool.connection_kwargs
    protocol = str(options.get("protocol") or _DEFAULT_PROTOCOL)
    options["parser_class"] = BoundedRESP2 if protocol == "2" else BoundedRESP3
    return client
