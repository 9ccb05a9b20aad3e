"""Lua scripts: every write a worker makes for a partition checks its epoch atomically.

A takeover increments the partition's epoch (a fencing token), so a worker that lost its lease
-- paused past it, or cut off from Redis -- is refused by the same script that would write,
before anything is written. All keys of one call share the partition's hash tag.
"""

from __future__ import annotations

from typing import Any

import redis

FENCED = "MEMNET_FENCED"

_CHECK = f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('{FENCED} epoch is now ' .. tostring(redis.call('GET', KEYS[1])))
end
"""

# KEYS: lease, epoch  ARGV: worker id, lease ms, floor  ->  the new epoch, or nil if held.
# The epoch always exceeds floor (the newest snapshot's epoch), even if Redis lost its data.
ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local epoch = redis.call('INCR', KEYS[2])
  if epoch <= tonumber(ARGV[3]) then
    epoch = tonumber(ARGV[3]) + 1
    redis.call('SET', KEYS[2], epoch)
  end
  return epoch
end
return false
"""

# KEYS: epoch, lease  ARGV: epoch, worker id, lease ms  ->  1 renewed, 0 lost
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: epoch, lease  ARGV: epoch, worker id  ->  1 released, 0 not ours
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: epoch, in  ARGV: epoch, consumer, count  ->  XREADGROUP reply
READ = (
    _CHECK
    + """
return redis.call('XREADGROUP', 'GROUP', 'memnet', ARGV[2], 'COUNT', ARGV[3],
                  'STREAMS', KEYS[2], '>')
"""
)

# KEYS: epoch, in, out, dead, offset
# ARGV: epoch, last id, maxlen (0: none), n responses, n dead letters,
#       then (id, msg) per response, (id, msg) per dead letter, then the ids to ack
# Publishing at the input entry's id makes a replayed publish fail instead of duplicating.
COMMIT = (
    _CHECK
    + """
local n_out, n_dead = tonumber(ARGV[4]), tonumber(ARGV[5])
local maxlen = tonumber(ARGV[3])
local published, duplicates = 0, 0
local function publish(key, id, msg)
  local r
  if maxlen > 0 then
    r = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, id, 'msg', msg)
  else
    r = redis.pcall('XADD', key, id, 'msg', msg)
  end
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'equal or smaller', 1, true) then
      duplicates = duplicates + 1
      return
    end
    error(r.err)
  end
  published = published + 1
end
local i = 6
for _ = 1, n_out do publish(KEYS[3], ARGV[i], ARGV[i + 1]); i = i + 2 end
for _ = 1, n_dead do publish(KEYS[4], ARGV[i], ARGV[i + 1]); i = i + 2 end
while i <= #ARGV do
  local last = math.min(i + 499, #ARGV)
  redis.call('XACK', KEYS[2], 'memnet', unpack(ARGV, i, last))
  i = last + 1
end
redis.call('SET', KEYS[5], ARGV[2])
return {published, duplicates}
"""
)

# KEYS: epoch, in, trimmed  ARGV: epoch, min id  ->  entries removed
TRIM = (
    _CHECK
    + """
local removed = redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2])
redis.call('SET', KEYS[3], ARGV[2])
return removed
"""
)

# KEYS: epoch, in  ARGV: epoch, consumer  ->  consumers removed (other, idle, nothing pending)
TIDY = (
    _CHECK
    + """
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[2], 'memnet')) do
  local name, pending
  for j = 1, #c, 2 do
    if c[j] == 'name' then name = c[j + 1] elseif c[j] == 'pending' then pending = c[j + 1] end
  end
  if name ~= ARGV[2] and pending == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[2], 'memnet', name)
    removed = removed + 1
  end
end
return removed
"""
)

# KEYS: workers  ARGV: worker id, ttl ms (0: leave), now (ms, Redis TIME)  ->  live ids
HEARTBEAT = """
local now = tonumber(ARGV[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class Fenced(Exception):
    """The partition's epoch moved on: this worker no longer owns it."""


class Scripts:
    """The scripts registered on one client (EVALSHA, loading them again when needed)."""

    def __init__(self, client: redis.Redis) -> None:
        self.acquire = client.register_script(ACQUIRE)
        self.renew = client.register_script(RENEW)
        self.release = client.register_script(RELEASE)
        self.read = client.register_script(READ)
        self.commit = client.register_script(COMMIT)
        self.trim = client.register_script(TRIM)
        self.tidy = client.register_script(TIDY)
        self.heartbeat = client.register_script(HEARTBEAT)
        self.client = client

    def load(self) -> None:
        """Load every script now (EVALSHA still reloads one that a restarted Redis lost)."""
        for name in ("acquire", "renew", "release", "read", "commit", "trim", "tidy", "heartbeat"):
            script = getattr(self, name)
            script.sha = self.client.script_load(script.script)


def fenced(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a fenced script; raise Fenced if the epoch check failed."""
    try:
        return call(*args, **kwargs)
    except redis.ResponseError as e:
        if FENCED in str(e):
            raise Fenced(str(e)) from None
        raise
