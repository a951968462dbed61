"""Lua scripts: the few steps that must be atomic. Every script touches keys of one hash slot."""

from __future__ import annotations

import hashlib
from typing import Any

import redis.exceptions as rex

__all__ = [
    "ANSWER",
    "DEAD_LETTER",
    "OPEN_INBOX",
    "PRUNE_CONSUMER",
    "REPLAY_DEAD",
    "UNREAD",
    "WATCH_DELETE",
    "WATCH_SET",
    "Script",
]


class Script:
    """A Lua script run by ``EVALSHA``, loaded on the first ``NOSCRIPT`` (e.g. after a restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, redis: Any, keys: list[Any], args: list[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    async def on_wire(self, topology: Any, keys: list[Any], args: list[Any]) -> Any:
        """The script on the wire of the node that owns ``keys[0]``: a pooled connection
        without redis-py's per-command timeout wrappers, for scripts on a path someone waits
        for (a request's answer, a watched value's set). A redirection or a demoted master is
        raised as a lost connection (redis-py's ``ConnectionError``), which the library's retry
        loop answers by refreshing the topology; ``NOSCRIPT`` loads the script and runs it."""
        from ._topology import routing_error
        from ._wire import pack

        wire = topology.wire_for(keys[0])
        command = pack(b"EVALSHA", self.sha, len(keys), *keys, *args)
        (reply,) = await wire.execute(command, 1)
        if isinstance(reply, rex.NoScriptError) or (
            isinstance(reply, BaseException) and "NOSCRIPT" in str(reply)
        ):
            reply = (await wire.execute(pack(b"SCRIPT", b"LOAD", self.source) + command, 2))[1]
        if isinstance(reply, BaseException):
            if routing_error(reply) is not None:
                raise rex.ConnectionError(f"{keys[0]} is not served by {wire.name}: {reply}")
            raise reply
        return reply


#: KEYS: stream, dead stream. ARGV: group, id, dead maxlen, then the dead entry's field/values.
#: Acks the original and appends the dead letter in one step; only the first of two racing
#: consumers (the one whose XACK removed the pending entry) writes the dead letter.
DEAD_LETTER = Script(
    """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  local fields = {}
  for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
end
return acked
"""
)

#: KEYS: dead stream, stream. ARGV: dead-letter id.
#: Re-appends the original fields (those not prefixed 'dead.') and deletes the dead letter.
REPLAY_DEAD = Script(
    """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #rows == 0 then return false end
local src = rows[1][2]
local fields = {}
for i = 1, #src, 2 do
  if string.sub(src[i], 1, 5) ~= 'dead.' then
    fields[#fields + 1] = src[i]
    fields[#fields + 1] = src[i + 1]
  end
end
if #fields == 0 then return false end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""
)

#: KEYS: stream. ARGV: group, consumer, min idle ms.
#: Deletes a consumer only if it holds no pending entry and has been idle long enough, in one
#: step: XGROUP DELCONSUMER would otherwise drop its pending entries beyond any claim.
PRUNE_CONSUMER = Script(
    """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending > 0 then return 0 end
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(consumers) do
  local name, idle
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'idle' then idle = c[i + 1] end
  end
  if name == ARGV[2] then
    if idle >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"""
)

#: KEYS: streams (one slot). ARGV: group.
#: The 1-based indexes of the streams that have entries after the group's last-delivered id,
#: or no such group (the read that follows then reports it): the question a subscription's
#: poll asks, answered without reading (and so without holding) anything.
UNREAD = Script(
    """
local function newer(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams > bms end
  return tonumber(aseq) > tonumber(bseq)
end
local out = {}
for i, key in ipairs(KEYS) do
  local groups = redis.pcall('XINFO', 'GROUPS', key)
  if groups['err'] then
    out[#out + 1] = i
  else
    local last = nil
    for _, g in ipairs(groups) do
      local name, delivered
      for j = 1, #g, 2 do
        if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then
          delivered = g[j + 1]
        end
      end
      if name == ARGV[1] then last = delivered end
    end
    if last == nil then
      out[#out + 1] = i
    else
      local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      if #newest > 0 and newer(newest[1][1], last) then out[#out + 1] = i end
    end
  end
end
return out
"""
)

#: KEYS: watch value (a hash: v, d, w), watch version counter. ARGV: encoded value, expected
#: version ('' for any; 0: no value set), ttl ms ('' for none), inline limit, publish command,
#: write id. Returns {1, new version}, or {0, current version} when the expected one differs.
#: The counter only grows (it outlives the value), and is never behind the value's version.
#: A retry of a write whose reply was lost finds its own write id: {1, its version}, not a
#: second version (nor, for a compare-and-set, a conflict with itself).
WATCH_SET = Script(
    """
local cur, wid = unpack(redis.call('HMGET', KEYS[1], 'v', 'w'))
cur = tonumber(cur or '0')
if wid == ARGV[6] then return {1, cur} end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= cur then return {0, cur} end
local n = redis.call('INCR', KEYS[2])
if n <= cur then
  n = cur + 1
  redis.call('SET', KEYS[2], string.format('%d', n))
end
local v = string.format('%d', n)
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[1], 'w', ARGV[6])
if ARGV[3] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('PERSIST', KEYS[1])
end
if #ARGV[1] <= tonumber(ARGV[4]) then
  redis.call(ARGV[5], KEYS[1], v .. ':1:' .. ARGV[1])
else
  redis.call(ARGV[5], KEYS[1], v .. ':2:')
end
return {1, n}
"""
)

#: KEYS: watch value, watch version counter. ARGV: expected version ('' for any), forget ('1':
#: delete the counter too), publish command. Returns {1, version deleted}, {0, 0} when there
#: was no value (whatever was expected: a retried delete finds its own work done), or
#: {-1, current version} when a value of another version is there.
WATCH_DELETE = Script(
    """
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if cur ~= 0 and ARGV[1] ~= '' and tonumber(ARGV[1]) ~= cur then return {-1, cur} end
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
if cur == 0 then return {0, 0} end
redis.call('DEL', KEYS[1])
redis.call(ARGV[3], KEYS[1], string.format('%d', cur) .. ':0:')
return {1, cur}
"""
)


#: KEYS: inbox. ARGV: maxlen, then the answer's field/values.
#: Appends an answer only to a live inbox (an existing stream): an answer to a requester that is
#: gone does not create its inbox again, and no request can make a responder write elsewhere.
ANSWER = Script(
    """
if redis.call('TYPE', KEYS[1]).ok ~= 'stream' then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
return 1
"""
)

#: KEYS: inbox. ARGV: ttl ms.
#: Creates the inbox as an empty stream (an XADD trimmed to nothing) unless it exists, and sets
#: its time to live. Returns 1 if it was created.
OPEN_INBOX = Script(
    """
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'o', '')
  created = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return created
"""
)
