--[[ rollback.lua: undo what ONE admission may have taken, when its reply was lost.

An admission that raised (a timeout, a dropped connection) may or may not have
run. This takes out exactly what that execution would own if it did, checked by
owner (unique per execution), and nothing else.

KEYS  one per entry, in ARGV[1] order
        I: idempotency record      L: lock key           K: bulkhead slots zset
        C: breaker probes zset     D: delivery set of the task id
      then, optionally, the admission request's marker (the last key admit.lua
      was given)
ARGV  [1] one letter per entry, e.g. "DILK"
      then one owner per entry: the execution's owner given to admit.lua (for L,
      the holder given to admit.lua: the owner, or owner, task name and label)
      then, with a marker, its TTL in ms
Returns {r1, r2, ...}: 1 removed, 0 nothing of ours there (admission did not
        run, or it was already undone, released or taken over)
Safe to run twice, and safe when admission never ran: an entry goes only if it
carries this owner. With a marker, only the first send to arrive does anything:
the marker already there means another send of this rollback ran, and a send
arriving late (Plan.rollback resends after a timeout; the first send may reach
Redis after the second) must not take what the owner acquired since (a
FencedLock retried with the same owner): all zeros, nothing written.
  I: only an in-progress record (s = P) of ours; a finished one is a result
  L: the lease value is "<token> <holder>"; the token is not known here, so the
     holder after the token is compared
  K, C: the owner's member of the zset
  D: the owner's member of the set (an older version's counter is a string:
     left alone)
Bucket tokens are not refunded (see Plan.rollback). The fencing counter keeps
the token the admission minted: a skipped token is harmless.
The marker (SET PX, written whatever was found) makes the admission request, if
it has not reached Redis yet (delayed in the network, or queued behind a stalled
server), do nothing when it does: admit.lua checks it before anything else. It
must outlive any such delay; Plan.rollback gives it the plan's longest lease, at
least ten minutes.
]]
local kinds = ARGV[1]
local out = {}
if #KEYS > #kinds then
  local marker = KEYS[#kinds + 1]
  if redis.call('EXISTS', marker) == 1 then
    for g = 1, #kinds do
      out[g] = 0
    end
    return out
  end
  redis.call('SET', marker, 1, 'PX', ARGV[#kinds + 2])
end
for g = 1, #kinds do
  local kind, key, owner = string.sub(kinds, g, g), KEYS[g], ARGV[g + 1]
  local removed = 0
  if kind == 'I' then
    local rec = redis.call('HMGET', key, 's', 'o')
    if rec[1] == 'P' and rec[2] == owner then
      redis.call('DEL', key)
      removed = 1
    end
  elseif kind == 'L' then
    local value = redis.call('GET', key)
    if value then
      local token = string.match(value, '^%d+ ')
      if token and string.sub(value, #token + 1) == owner then
        redis.call('DEL', key)
        removed = 1
      end
    end
  elseif kind == 'K' or kind == 'C' then
    removed = redis.call('ZREM', key, owner)
  elseif kind == 'D' then
    if redis.call('TYPE', key).ok == 'set' then
      removed = redis.call('SREM', key, owner)
    end
  else
    return redis.error_reply('rollback.lua: unknown guard ' .. kind)
  end
  out[g] = removed
end
return out
