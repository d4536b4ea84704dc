"""What the fleet reads from Redis, bounded: every fleet key is writable by every fleet member
(and by anyone holding the ACL user's password), so a reply may hold whatever they wrote there.

Two layers:
- The reads of values a peer writes go through Lua scripts that hand back at most a few hundred
  bytes of each (a stream entry's two fields, an active ban, a host's mark), one stream entry at a
  time: a 200 MB field or an entry of a million fields never leaves Redis.
- Underneath, every reply on a fleet connection has a budget (MAX_REPLY, each element and bulk
  string counted with an overhead): a larger one is refused as its header is read, before
  anything is allocated for it, and the connection dropped (`ReplyTooLarge`). The one read that
  cannot go through a script, the XREAD BLOCK that waits for news, takes its answer only as "news
  came" (`at_most` MAX_WAKE); a reply past the budget says the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from redis._parsers import _RESP2Parser, _RESP3Parser
from redis._parsers.socket import SocketBuffer
from redis.exceptions import InvalidResponse
from redis.utils import DEFAULT_RESP_VERSION, SENTINEL

if TYPE_CHECKING:
    import redis

# Far above any legitimate reply (a batch of 10,000 active bans is at most 11 MB counted this
# way), far below what would hurt a host: the Python objects of a reply take a few times this.
MAX_REPLY = 32 * 2**20
# The blocking read's: one entry, in its bounded form well under a kilobyte.
MAX_WAKE = 64 * 2**10
ELEMENT = 64  # what one element costs beyond its bytes (a Python object, a list slot)
_SIZED = frozenset(bytes([kind]) for kind in b"$*%~>=|!")
_PAIRS = frozenset((b"%", b"|"))  # maps and attributes: two elements per count
_BYTES = frozenset((b"$", b"=", b"!"))  # bulk strings, verbatim strings, bulk errors

MAX_FIELD = 1024  # a stream entry's field or an active ban as a script hands it back; longer: ""
MAX_MARK = 64  # a host's mark: 41 bytes at most, so a longer one is cut, never valid

# One entry at a time (XRANGE ... COUNT 1): Lua holds one entry's fields, never a batch of them.
# Each entry comes back as {id, d, s}: "" for a field missing, or longer than ARGV[3].
READ = """
local function first(found)
  if #found > 0 then return found[1][1] end
  return ''
end
local oldest = first(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1))
local newest = first(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1))
local entries, start, limit = {}, ARGV[1], tonumber(ARGV[3])
for _ = 1, tonumber(ARGV[2]) do
  local found = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1)
  if #found == 0 then break end
  local id, fields, d, s = found[1][1], found[1][2], '', ''
  for i = 1, #fields - 1, 2 do
    local value = fields[i + 1]
    if #value <= limit then
      if fields[i] == 'd' then d = value elseif fields[i] == 's' then s = value end
    end
  end
  entries[#entries + 1] = {id, d, s}
  start = '(' .. id
end
return {oldest, newest, entries}
"""

# HSCAN's values, each "" when longer than ARGV[3] (refused as malformed, as an empty one is).
ACTIVE = """
local found = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local values, limit = {}, tonumber(ARGV[3])
for i = 2, #found[2], 2 do
  local value = found[2][i]
  if #value > limit then value = '' end
  values[#values + 1] = value
end
return {found[1], values}
"""

MARK = """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if value and #value > tonumber(ARGV[2]) then return string.sub(value, 1, tonumber(ARGV[2])) end
return value
"""


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

    def readline(self, timeout: float | object = SENTINEL) -> bytes:
        line = super().readline(timeout=timeout)
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
    protocol = str(options.get("protocol") or DEFAULT_RESP_VERSION)
    options["parser_class"] = BoundedRESP2 if protocol == "2" else BoundedRESP3
    return client
