"""What the fleet reads from Redis, bounded: every fleet key is writable by every fleet member
(and by anyone holding the ACL user's password), so a reply may hold whatever they wrote there.

Two layers:
- The reads of values a peer writes go through Lua scripts that hand back at most MAX_FIELD bytes
  of each (a stream entry's two fields, an active ban; MAX_MARK of a host's mark), one stream
  entry at a time: a 200 MB field or an entry of a million fields never leaves Redis.
- Underneath, every reply on a fleet connection has a budget (fleet.budget, which needs redis-py
  and is imported with it, only when a fleet is configured).
"""

from __future__ import annotations

MAX_FIELD = 1024  # a stream entry's field or an active ban as a script hands it back; longer: ""
MAX_MARK = 64  # a host's mark: 41 bytes at most, so a longer one is cut, never valid
# What one read may go through in Redis (per field 128 and its bytes): 1,000 entries of ours
# come to about 1 MB, and Redis goes through 16 MB of many small fields in about 0.1 s.
MAX_WORK = 16 * 2**20

# One entry at a time (XRANGE ... COUNT 2, the one before it passed over): Lua holds two entries'
# fields at most, never a batch of them.
# Each entry comes back as {id, d, s}: "" for a field missing, or longer than ARGV[3]. The read
# ends early once the entries' fields and bytes pass ARGV[4] (counted as fleet.budget counts a
# reply): a thousand entries of many fields took Redis past the client's READ_TIMEOUT, the read
# was tried again from the same cursor, and the reader never got past them. One entry at least.
READ = """
local function first(found)
  if #found > 0 then return found[1][1] end
  return ''
end
local oldest = first(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1))
local newest = first(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1))
local entries, start, limit, work = {}, ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local spent = 0
for _ = 1, tonumber(ARGV[2]) do
  if spent > work then break end
  -- From `start` on, without it: XRANGE's exclusive '(' form needs Redis 6.2 (Debian 11 and
  -- Ubuntu 22.04 ship 6.0), so the entry at `start` itself, read before, is passed over.
  local found = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 2)
  local entry = found[1]
  if entry and entry[1] == start then entry = found[2] end
  if not entry then break end
  local id, fields, d, s = entry[1], entry[2], '', ''
  for i = 1, #fields - 1, 2 do
    local value = fields[i + 1]
    spent = spent + 128 + #fields[i] + #value
    if #value <= limit then
      if fields[i] == 'd' then d = value elseif fields[i] == 's' then s = value end
    end
  end
  entries[#entries + 1] = {id, d, s}
  start = id
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
