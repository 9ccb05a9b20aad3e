"""Lua scripts: every write a worker makes for a partition checks its epoch atomically.

A takeover increments the partition's epoch (a fencing token), so a worker that lost its lease
-- paused past it, or cut off from Redis -- is refused by the same script that would write,
before anything is written. All keys of one call share the partition's hash tag.

The same checks notice that Redis lost data (FLUSHALL, a restart from an older RDB, a
failover to a lagging replica) without INFO: epochs only ever grow, so a missing or smaller
epoch means Redis forgot a takeover; the offset key holds what the owner last committed, so
any other value means Redis forgot a commit; and a batch about to be committed must still be
in the input stream. Those refusals start with MEMNET_LOST; the worker then rebuilds the
partition from its newest snapshot (worker/ownership.py).
"""

from __future__ import annotations

from typing import Any

import redis

from worker.faults import FENCED, LOST, as_fault

# KEYS[1] epoch, ARGV[1] the caller's epoch; the last key the partition's taker, the last
# argument the caller's worker id. The taker is who took the epoch (ACQUIRE): after Redis
# lost data (an older RDB, a lagging replica), the epoch counter can come back below an
# epoch a live owner holds, and another worker's next take then gets that very epoch; the
# epoch alone would accept both owners (each reading entries the other never applies).
_CHECK = f"""
local epoch = redis.call('GET', KEYS[1])
if epoch ~= ARGV[1] then
  if not epoch or tonumber(epoch) < tonumber(ARGV[1]) then
    return redis.error_reply('{LOST} epoch is ' .. tostring(epoch) .. ', was ' .. ARGV[1])
  end
  return redis.error_reply('{FENCED} epoch is now ' .. epoch)
end
local taker = redis.call('GET', KEYS[#KEYS])
if taker ~= ARGV[#ARGV] then
  return redis.error_reply('{FENCED} epoch ' .. epoch .. ' was taken by ' .. tostring(taker))
end
"""

# KEYS[n] offset, ARGV[m] what the caller last committed ('' for nothing).
_OFFSET = f"""
local function check_offset(key, committed, also)
  local offset = redis.call('GET', key) or ''
  if offset ~= committed and offset ~= also then
    return redis.error_reply('{LOST} offset is ' .. (offset == '' and 'gone' or offset)
                             .. ', committed ' .. (committed == '' and 'nothing' or committed))
  end
end
"""

# KEYS: lease, epoch, taker, serve, model, switch, offset
# ARGV: worker id, lease ms, floor, the worker's model
# ->  {the new epoch, the model that served it before or false, the switch point or false};
# nil if held; -1 if another model serves the partition (serve: set by memnet deploy).
# The epoch always exceeds floor (the newest snapshot's epoch), even if Redis lost its data;
# the taker records who took it (_CHECK). The first taker of another model than the one
# that served the partition records the switch point: entries up to the committed offset
# were the previous model's, every later one is this model's (shown by memnet status). In
# the same script as the take, so no other owner commits in between, and a worker of the
# old model that still thinks it is served (its last look at PREFIX:meta was before the
# deploy) cannot take the partition back.
ACQUIRE = """
local serve = redis.call('GET', KEYS[4])
if serve and serve ~= ARGV[4] then return -1 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
local epoch = redis.call('INCR', KEYS[2])
if epoch <= tonumber(ARGV[3]) then
  epoch = tonumber(ARGV[3]) + 1
  redis.call('SET', KEYS[2], epoch)
end
redis.call('SET', KEYS[3], ARGV[1])
local served = redis.call('GET', KEYS[5])
local after = false
if served ~= ARGV[4] then
  if served then
    after = redis.call('GET', KEYS[7]) or '0-0'
    redis.call('HSET', KEYS[6], 'from', served, 'to', ARGV[4], 'after', after, 'epoch', epoch)
  end
  redis.call('SET', KEYS[5], ARGV[4])
end
return {epoch, served or false, after}
"""

# KEYS: epoch, lease, taker  ARGV: epoch, worker id, lease ms  ->  1 renewed, 0 lost (the
# epoch moved on, or another worker took this very epoch: _CHECK), -1 Redis lost data (the
# epoch is gone or went down)
RENEW = """
local epoch = redis.call('GET', KEYS[1])
if not epoch or tonumber(epoch) < tonumber(ARGV[1]) then return -1 end
if epoch ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return 0 end
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

# KEYS: epoch, in, offset, taker  ARGV: epoch, consumer, count, committed, worker id
#   ->  XREADGROUP reply
READ = (
    _CHECK
    + _OFFSET
    + """
local refused = check_offset(KEYS[3], ARGV[4], ARGV[4])
if refused then return refused end
return redis.call('XREADGROUP', 'GROUP', 'memnet', ARGV[2], 'COUNT', ARGV[3],
                  'STREAMS', KEYS[2], '>')
"""
)

# KEYS: epoch, in, out, dead, offset, taker
# ARGV: epoch, last id, maxlen (0: none), n responses, n dead letters, committed before,
#       "id length" per response then per dead letter (space-separated), their messages
#       concatenated, the ids to ack (space-separated): a few arguments per batch, not
#       three per entry (redis-py packs each argument in Python; entry ids hold no spaces),
#       worker id
# Publishing at the input entry's id makes a replayed publish fail instead of duplicating.
# A commit whose reply was lost may be sent again: the offset may already be its last id.
COMMIT = (
    _CHECK
    + _OFFSET
    + f"""
local refused = check_offset(KEYS[5], ARGV[6], ARGV[2])
if refused then return refused end
if #redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2]) == 0 then
  return redis.error_reply('{LOST} input entry ' .. ARGV[2] .. ' is gone')
end
"""
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
    if string.find(tostring(r.err), 'equal or smaller', 1, true) then
      duplicates = duplicates + 1
      return
    end
    error(r.err)
  end
  published = published + 1
end
local msgs, at, n, ids, bodies = ARGV[8], 1, 0, {}, {}
for id, len in string.gmatch(ARGV[7], '(%S+) (%d+)') do
  local next_at = at + tonumber(len)
  n = n + 1
  ids[n] = id
  bodies[n] = string.sub(msgs, at, next_at - 1)
  at = next_at
end
if n ~= n_out + n_dead or at ~= #msgs + 1 then
  return redis.error_reply('ERR memnet commit: outputs do not match their counts')
end
for j = 1, n do publish(j <= n_out and KEYS[3] or KEYS[4], ids[j], bodies[j]) end
local acks = {}
for id in string.gmatch(ARGV[9], '%S+') do
  acks[#acks + 1] = id
  if #acks == 500 then
    redis.call('XACK', KEYS[2], 'memnet', unpack(acks))
    acks = {}
  end
end
if #acks > 0 then redis.call('XACK', KEYS[2], 'memnet', unpack(acks)) end
redis.call('SET', KEYS[5], ARGV[2])
return {published, duplicates}
"""
)

# KEYS: epoch, in, trimmed, deploying, unarchived, taker
# ARGV: epoch, min id, model, archived (1/0), worker id
# ->  entries removed, or -1: a deploy to another model is under way (memnet deploy), which
# needs the input kept. Unarchived: the entries below min id were not archived (memnet
# rebuild refuses a history with that hole). Both points only ever go up: a trim below
# them (a newly deployed model's first snapshots can be older than the old model's trim)
# removes nothing, and lowering them would let a fallback snapshot below the entries
# already gone pass for complete (Ownership._after_trim).
TRIM = (
    _CHECK
    + """
local function below(a, b)  -- stream ids 'ms-seq' compared as numbers of any size
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not (am and bm) then return false end
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local function raise(key, point)
  local was = redis.call('GET', key)
  if not was or below(was, point) then redis.call('SET', key, point) end
end
local deploying = redis.call('GET', KEYS[4])
if deploying and deploying ~= ARGV[3] then return -1 end
local removed = redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2])
raise(KEYS[3], ARGV[2])
if ARGV[4] == '0' then raise(KEYS[5], ARGV[2]) end
return removed
"""
)

# KEYS: epoch, in, taker  ARGV: epoch, id, worker id  ->  1 created, 0 it existed
# The group is recreated (an operator's XGROUP DESTROY) at the last applied entry.
ENSURE_GROUP = (
    _CHECK
    + """
local r = redis.pcall('XGROUP', 'CREATE', KEYS[2], 'memnet', ARGV[2], 'MKSTREAM')
if type(r) == 'table' and r.err then
  if string.find(tostring(r.err), 'BUSYGROUP', 1, true) then return 0 end
  return redis.error_reply(r.err)
end
return 1
"""
)

# KEYS: epoch, in, taker  ARGV: epoch, consumer (the worker id)  ->  consumers removed (other,
# idle, nothing pending)
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


# KEYS: a stream, a string, a sorted set (probe keys, removed)  ->  {command, error, ...}
# Each command the scripts above call, called once the way they call it: Redis checks a
# script's commands against the user's ACL rules only when it runs them, so a missing right
# would otherwise surface at the first trim or handover (worker.probe_rights).
PROBE = """
local refused = {}
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err then
    local e = tostring(r.err)
    if string.find(e, 'NOPERM', 1, true) or string.find(e, "can't run this command", 1, true) then
      table.insert(refused, (...))
      table.insert(refused, e)
    end
  end
end
try('XADD', KEYS[1], 'MAXLEN', '~', 10, '*', 'msg', 'probe')
try('XGROUP', 'CREATE', KEYS[1], 'memnet', '0', 'MKSTREAM')
try('XREADGROUP', 'GROUP', 'memnet', 'probe', 'COUNT', 1, 'STREAMS', KEYS[1], '>')
try('XACK', KEYS[1], 'memnet', '0-1')
try('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
try('XINFO', 'CONSUMERS', KEYS[1], 'memnet')
try('XGROUP', 'DELCONSUMER', KEYS[1], 'memnet', 'probe')
try('XTRIM', KEYS[1], 'MINID', '0')
try('SET', KEYS[2], '1', 'PX', 60000)
try('GET', KEYS[2])
try('INCR', KEYS[2])
try('ZADD', KEYS[3], 0, 'probe')
try('ZRANGE', KEYS[3], 0, -1)
try('ZREM', KEYS[3], 'probe')
try('ZREMRANGEBYSCORE', KEYS[3], '-inf', 0)
try('DEL', KEYS[1], KEYS[2], KEYS[3])
return refused
"""


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
        self.ensure_group = client.register_script(ENSURE_GROUP)
        self.heartbeat = client.register_script(HEARTBEAT)
        self.client = client

    def load(self) -> None:
        """Load every script now (EVALSHA still reloads one that a restarted Redis lost)."""
        names = ("acquire", "renew", "release", "read", "commit", "trim", "tidy", "ensure_group")
        for name in (*names, "heartbeat"):
            script = getattr(self, name)
            script.sha = self.client.script_load(script.script)


def fenced(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a fenced script; raise Fenced or Lost if its checks refused the call."""
    try:
        return call(*args, **kwargs)
    except redis.ResponseError as e:
        raise as_fault(e) from None
