"""The fleet's Redis: one connection per fleet thread, and the few commands the fleet uses.

Data model (all keys carry the hash tag {FLEET_NAME}, so a fleet lives on one Cluster slot):
- `portsentry:{NAME}:decisions`, a Stream: every ban and lift, signed (fleet.decision), trimmed
  with MAXLEN ~ STREAM_LENGTH. Readers follow it with XREAD BLOCK from a saved id.
- `portsentry:{NAME}:bans`, a Hash: address -> the signed decision of its active fleet ban, and
  `portsentry:{NAME}:expiry`, a Sorted Set: address -> when that ban ends (+inf: never). A host
  that joins, or fell behind what the stream keeps, loads these instead of the stream's past.
- `portsentry:{NAME}:hosts`, a Hash: host id -> the mark (`epoch:seq`) of the last decision
  Redis took from that host. A host compares it with the last one it sent: when they differ,
  Redis lost what it was sent (a restart without persistence or from an older snapshot, a
  failover to a replica that lagged, a flush), even when no command failed: redis-py reconnects
  a connection the server closed while it sat idle without saying so.
One Lua script adds the entry and updates the active set and the mark atomically, so they never
disagree: the longer of two bans of one address holds (ZADD GT), a lift removes it. What is read
back is bounded (fleet.bounded): every fleet member can write any bytes to these keys.

Nothing here decides anything; fleet.node owns the threads and the cursors. Needs the redis
package (the optional dependency `portsentry[fleet]`), imported only when a fleet is configured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from portsentry.core.probe import IPAddress
from portsentry.fleet import bounded
from portsentry.fleet.decision import FIELD_DATA, FIELD_SIGNATURE, Decision, encode, pack
from portsentry.fleet.settings import FleetSettings, redact
from portsentry.journal.journal import one_line

if TYPE_CHECKING:
    import redis

STREAM_LENGTH = 200_000  # decisions kept; a host further behind loads the active set instead
SNAPSHOT_BATCH = 10_000
CONNECT_TIMEOUT = 2.0
# Above the longest XREAD BLOCK, so a blocking read is not cut short; a dead server is noticed
# by the next command or the keepalive.
READ_TIMEOUT = 10.0

# Every key's type is checked before anything is written: a script that fails half-way keeps
# what it wrote, and a stream entry added before a key of the wrong type (anyone with access can
# make one) was added again at every retry of the publisher.
_PUBLISH = """
for i, kind in ipairs({'stream', 'hash', 'zset', 'hash'}) do
  local found = redis.call('TYPE', KEYS[i])['ok']
  if found ~= kind and found ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. found .. ', the fleet keeps a ' .. kind)
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[2], 's', ARGV[3])
if ARGV[4] == 'ban' then
  if redis.call('ZADD', KEYS[3], 'GT', 'CH', ARGV[6], ARGV[5]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[5], ARGV[7])
  end
else
  redis.call('ZREM', KEYS[3], ARGV[5])
  redis.call('HDEL', KEYS[2], ARGV[5])
end
local before = redis.call('HGET', KEYS[4], ARGV[8])
if before and #before > tonumber(ARGV[10]) then before = string.sub(before, 1, tonumber(ARGV[10])) end
redis.call('HSET', KEYS[4], ARGV[8], ARGV[9])
return {id, before}
"""

# Ended by the host's clock and by Redis's as the newest entry's id gives it (TIME is outside the
# ACL the docs give): a host whose clock runs ahead must not take running bans out of the set.
_PRUNE = """
local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #newest == 0 then return 0 end
local redis_now = tonumber(string.match(newest[1][1], '^%d+')) / 1000
local upto = string.format('%.6f', math.min(tonumber(ARGV[1]), redis_now))
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', upto, 'LIMIT', 0, ARGV[2])
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
  redis.call('HDEL', KEYS[1], unpack(gone))
end
return #gone
"""


def mark(epoch: int, seq: int) -> bytes:
    """What the hosts hash holds for a host's decision (epoch, seq)."""
    return f"{epoch}:{seq}".encode()


def parse_mark(value: bytes | None) -> tuple[int, int] | None:
    """(epoch, seq) of a mark read back; None for no mark or one this version did not write."""
    epoch, colon, seq = (value or b"").partition(b":")
    # At most 20 digits each (both are 64-bit): the hash is writable by every fleet member, and
    # int() of 4,300 digits raises, which would stall this host's publishing for good.
    if not colon or not (epoch.isdigit() and seq.isdigit()) or len(epoch) > 20 or len(seq) > 20:
        return None
    return int(epoch), int(seq)


def compare_marks(held: bytes | None, sent: bytes, tried: tuple[int, int] | None) -> str:
    """What the mark Redis holds for this host (`held`) says, against the last one Redis is known
    to have taken from it (`sent`) and the newest one handed to Redis (`tried`): "cut", a publish
    that failed part-way (Redis took its first part); "lost", one sent before the last, or none
    (an older state of Redis); "other", one this host never sent (another host under its id)."""
    before, last = parse_mark(held), parse_mark(sent)
    if held is None:
        return "lost"
    if before is None or last is None or before[0] != last[0]:
        return "other"
    if before[1] < last[1]:
        return "lost"
    cut = tried is not None and tried[0] == last[0] and last[1] < before[1] <= tried[1]
    return "cut" if cut else "other"


@dataclass(frozen=True)
class Published:
    """What one publish did: the stream ids, in order, and the host's mark Redis held before the
    first of them (None: none at all)."""

    ids: list[bytes]
    before: bytes | None


class LinkError(Exception):
    """Redis cannot be reached or refused a command; the fleet retries, detection goes on."""


def link_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError, LinkError)


def connect(settings: FleetSettings) -> redis.Redis:
    """A client for FLEET_REDIS_URL with the password from FLEET_PASSWORD_FILE; it connects on
    its first command. No retries of its own: the fleet threads retry with their own backoff."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from portsentry.fleet.budget import bound

    parts = urlsplit(settings.url)
    common: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": READ_TIMEOUT,
        "retry": Retry(NoBackoff(), 0), "client_name": f"portsentry-{settings.host_id}",
    }
    if parts.scheme != "unix":
        common["socket_keepalive"] = True  # a server gone without a word is noticed by the kernel
    if settings.password is not None:
        common["password"] = settings.password
    try:
        if parts.scheme.endswith("+sentinel"):
            return bound(_sentinel(settings, parts.scheme.startswith("rediss"), common))
        if parts.scheme.endswith("+cluster"):
            return bound(_cluster_node(settings, parts.scheme.startswith("rediss"), common))
        client: redis.Redis = redis.Redis.from_url(settings.url, **common)
    except ValueError:
        # Not redis-py's message: it may quote a part of the URL that holds the password.
        raise LinkError(f"{settings.redacted}: a port, database or option redis-py cannot read") from None
    return bound(client)


@dataclass(frozen=True)
class Servers:
    """What a sentinel or cluster URL names: the servers to ask, and the options of the URL."""

    hosts: tuple[tuple[str, int], ...]
    path: tuple[str, ...]
    username: str | None
    options: dict[str, str]
    password: str | None = field(default=None, repr=False)  # in the URL; FLEET_PASSWORD_FILE wins


def servers(url: str, default_port: int) -> Servers:
    """`scheme://[user[:password]@]host[:port][,host[:port]...]/path?options`, the form of the
    sentinel and cluster URLs (one server list where urlsplit expects one host)."""
    parts = urlsplit(url)
    hosts = []
    for item in parts.netloc.rsplit("@", 1)[-1].split(","):
        host, colon, port = item.rpartition(":")
        if not colon or host.endswith(":") or (":" in host and not host.startswith("[")):
            host, port = item, ""  # no port, or a bare IPv6 address
        host = host.strip("[]")
        if not host or (port and not port.isdigit()):
            raise LinkError(f"{redact(url)}: {item!r} is not a host[:port]")
        hosts.append((host, int(port) if port else default_port))
    path = tuple(unquote(p) for p in parts.path.split("/") if p)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return Servers(tuple(hosts), path, username, dict(parse_qsl(parts.query)), password)


def _sentinel(settings: FleetSettings, tls: bool, common: dict[str, Any]) -> redis.Redis:
    """redis+sentinel://[user@]host:port[,host:port...]/service[/db][?options]: the master of
    `service` as the sentinels name it, asked again after every failover. The sentinels
    themselves are asked without credentials, as redis-py does, unless the URL says
    sentinel_auth=yes (sentinels with the same ACL user and password as the servers)."""
    from redis.sentinel import Sentinel

    spec = servers(settings.url, 26379)
    if not spec.path:
        raise LinkError(f"{settings.redacted}: a sentinel URL names the service: .../SERVICE")
    options: dict[str, Any] = dict(common)
    if spec.username:
        options["username"] = spec.username
    if spec.password is not None:
        options.setdefault("password", spec.password)
    if len(spec.path) > 1:
        options["db"] = int(spec.path[1])
    query = dict(spec.options)
    sentinel_auth = query.pop("sentinel_auth", "no").lower() in ("yes", "1", "true")
    options.update(query)
    if tls:
        options["ssl"] = True
    drop = {"db"} if sentinel_auth else {"db", "username", "password"}
    sentinel_options = {k: v for k, v in options.items() if k not in drop}
    client: redis.Redis = Sentinel(list(spec.hosts), sentinel_kwargs=sentinel_options,
                                   **options).master_for(spec.path[0])
    return client


def _cluster_node(settings: FleetSettings, tls: bool, common: dict[str, Any]) -> redis.Redis:
    """redis+cluster://[user@]host:port[,host:port...][?options]: the master that serves the
    fleet's slot, as the first seed that answers CLUSTER SLOTS says. Every fleet key carries one
    hash tag, so one node holds them all and a plain client suffices; after a failover or a
    resharding the node answers MOVED, the fleet thread reconnects and asks again."""
    import redis
    from redis.crc import key_slot

    spec = servers(settings.url, 6379)
    options: dict[str, Any] = dict(common)
    if spec.username:
        options["username"] = spec.username
    if spec.password is not None:
        options.setdefault("password", spec.password)
    options.update(spec.options)
    if tls:
        options["ssl"] = True
    slot = key_slot(settings.keys()[0].encode())
    failures = []
    for host, port in spec.hosts:
        seed: Any = redis.Redis(host=host, port=port, **options)  # CLUSTER SLOTS is untyped
        try:
            owner = slot_owner(seed.execute_command("CLUSTER", "SLOTS"), slot)
        except (redis.RedisError, OSError) as error:
            failures.append(f"{host}:{port}: {describe_error(error)}")
            continue
        finally:
            seed.close()
        if owner is None:
            failures.append(f"{host}:{port}: no master serves slot {slot}")
            continue
        node: redis.Redis = redis.Redis(host=owner[0] or host, port=owner[1], **options)
        return node
    raise redis.ConnectionError(f"{settings.redacted}: no cluster seed told where slot {slot} is: "
                                + "; ".join(failures))


def slot_owner(slots: Any, slot: int) -> tuple[str, int] | None:
    """The master (address, port) serving `slot` in a CLUSTER SLOTS answer."""
    for entry in slots if isinstance(slots, list) else ():
        if len(entry) >= 3 and int(entry[0]) <= slot <= int(entry[1]):
            address = entry[2][0]
            return (address.decode() if isinstance(address, bytes) else str(address)), int(entry[2][1])
    return None


def describe_error(error: BaseException | None) -> str | None:
    if error is None:
        return None
    # redis-py's messages name host and port, never the password; cut them short all the same.
    # An error reply is the server's own text: `portsentry status` prints this on a terminal.
    return one_line(f"{type(error).__name__}: {error}")[:200]


class Link:
    """One thread's Redis connection and the fleet's commands on it."""

    def __init__(self, settings: FleetSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        # Any: redis-py's annotations cover every response shape of every protocol version;
        # the few answers used here are checked where they are read.
        self.client: Any = client if client is not None else connect(settings)
        self.stream, self.bans_key, self.expiry_key, self.hosts_key = settings.keys()
        self._publish = self.client.register_script(_PUBLISH)
        self._prune = self.client.register_script(_PRUNE)
        self._read = self.client.register_script(bounded.READ)
        self._active = self.client.register_script(bounded.ACTIVE)
        self._mark = self.client.register_script(bounded.MARK)

    def ping(self) -> None:
        self.client.ping()

    def publish(self, decisions: Sequence[Decision]) -> Published:
        """Add `decisions`, in order, in one round trip; each moves its host's mark."""
        key, fleet = self.settings.key, self.settings.name
        pipe = self.client.pipeline(transaction=False)
        for decision in decisions:
            fields = encode(decision, key, fleet)
            score = "+inf" if decision.expires is None else repr(decision.expires)
            self._publish(keys=[self.stream, self.bans_key, self.expiry_key, self.hosts_key],
                          args=[STREAM_LENGTH, fields[FIELD_DATA], fields[FIELD_SIGNATURE], decision.kind,
                                decision.address.compressed, score, pack(decision, key, fleet),
                                decision.host, mark(decision.epoch, decision.seq), bounded.MAX_MARK],
                          client=pipe)
        answers = pipe.execute()
        before = answers[0][1] if answers else None
        return Published([bytes(answer[0]) for answer in answers], None if before is None else bytes(before))

    def forget(self, addresses: Sequence[IPAddress]) -> None:
        """Take `addresses` out of the active set (unblocks it lost), without a stream entry."""
        if not addresses:
            return
        members = [address.compressed for address in addresses]
        # No MULTI: the ACL the docs give has no @transaction, and a moment between the two is
        # harmless (readers load the hash; the sorted set only prunes and counts).
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(self.expiry_key, *members)
        pipe.hdel(self.bans_key, *members)
        pipe.execute()

    def held_mark(self) -> bytes | None:
        """The mark Redis holds for this host."""
        value = self._mark(keys=[self.hosts_key], args=[self.settings.host_id, bounded.MAX_MARK])
        return None if value is None else bytes(value)

    def set_mark(self, value: bytes) -> None:
        self.client.hset(self.hosts_key, self.settings.host_id, value)

    def last_id(self) -> bytes:
        """The newest entry's id (b"0-0" for an empty stream): where a reader that has just
        loaded the active set goes on from."""
        return self.ends()[1] or b"0-0"

    def ends(self) -> tuple[bytes | None, bytes | None]:
        """The stream's oldest and newest ids (None, None when it is empty or missing)."""
        oldest, newest, _entries = self._entries_after(b"0-0", 0)
        return oldest, newest

    def follow(self, after: bytes, block_ms: int, count: int
               ) -> tuple[bytes | None, bytes | None, list[tuple[bytes, dict[bytes, bytes]]]]:
        """The stream's oldest and newest ids, then the entries after `after`, waiting up to
        `block_ms` for the first (0: not at all): the reader learns with every read whether
        entries after its cursor were trimmed or lost, not only when it reconnects. Each entry
        holds its fields d and s only, none longer than MAX_FIELD (fleet.bounded)."""
        oldest, newest, entries = self._entries_after(after, count)
        if entries or not block_ms:
            return oldest, newest, entries
        from portsentry.fleet.budget import MAX_WAKE, ReplyTooLarge, at_most

        try:
            # Only "news came": what came is read again within bounds. (Redis itself takes
            # BLOCK 0 as "for ever".)
            with at_most(MAX_WAKE):
                came = self.client.xread({self.stream: after}, count=1, block=block_ms)
        except ReplyTooLarge:
            came = True  # an entry past the budget came: the read below takes its bounded form
        return self._entries_after(after, count) if came else (oldest, newest, entries)

    def _entries_after(self, after: bytes, count: int
                       ) -> tuple[bytes | None, bytes | None, list[tuple[bytes, dict[bytes, bytes]]]]:
        oldest, newest, found = self._read(keys=[self.stream], args=[after, count, bounded.MAX_FIELD,
                                                                     bounded.MAX_WORK])
        entries = []
        for entry_id, data, signature in found:
            fields = {name: bytes(value) for name, value in ((FIELD_DATA, data), (FIELD_SIGNATURE, signature))
                      if value}
            entries.append((bytes(entry_id), fields))
        return (bytes(oldest) or None), (bytes(newest) or None), entries

    def active(self) -> Iterator[list[bytes]]:
        """The signed decisions of the fleet's active bans, a batch at a time (b"" for one past
        MAX_FIELD, refused as malformed when applied)."""
        cursor: bytes | int = 0
        while True:
            cursor, found = self._active(keys=[self.bans_key],
                                         args=[cursor, SNAPSHOT_BATCH, bounded.MAX_FIELD])
            if found:
                yield [bytes(value) for value in found]
            if int(cursor) == 0:
                return

    def active_count(self) -> int:
        return int(self.client.zcard(self.expiry_key))

    def prune(self, now: float, limit: int = 10_000) -> int:
        """Forget active-set entries whose ban has ended by `now` and by Redis's clock; any host
        may do it, any number of times."""
        return int(self._prune(keys=[self.bans_key, self.expiry_key, self.stream], args=[repr(now), limit]))

    def interrupt(self) -> None:
        """From another thread (the stop): end the command this link's thread waits on, at
        once; that thread sees a link error."""
        with contextlib.suppress(Exception):
            self.client.connection_pool.disconnect(inuse_connections=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection must not raise on the way out
            self.client.close()
