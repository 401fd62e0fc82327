--[[ complete.lua: settle every guard of one finished execution in ONE round trip.

KEYS  the keys of each guard, in plan order
        I (idempotency): record key
        L (lock):        lock key
        K (bulkhead):    slots zset
ARGV  [1] plan: one letter per guard, e.g. "IL"
      then each guard's arguments, in plan order
        I: owner, outcome, payload, ttl_ms
           outcome S = succeeded (payload: result JSON), F = failed and kept
           (payload: error JSON), X = forget (nothing happened; a later
           delivery may run)
        L: lease value ("<token> <owner>") returned by admission
        K: owner
Returns {r1, r2, ...}: 1 settled, 0 not ours any more (expired or taken over;
        left untouched)
Safe to run twice: the second run finds nothing of ours and changes nothing.
]]
local plan = ARGV[1]
local out = {}
local ki, ai = 1, 2
for g = 1, #plan do
  local kind = string.sub(plan, g, g)
  if kind == 'I' then
    local k = KEYS[ki]
    if redis.call('HGET', k, 'o') == ARGV[ai] then
      local outcome = ARGV[ai + 1]
      if outcome == 'X' then
        redis.call('DEL', k)
      else
        redis.call('HSET', k, 's', outcome, 'r', ARGV[ai + 2])
        redis.call('HDEL', k, 'o', 'd')
        redis.call('PEXPIRE', k, ARGV[ai + 3])
      end
      out[g] = 1
    else
      out[g] = 0
    end
    ki, ai = ki + 1, ai + 4
  elseif kind == 'L' then
    if redis.call('GET', KEYS[ki]) == ARGV[ai] then
      redis.call('DEL', KEYS[ki])
      out[g] = 1
    else
      out[g] = 0
    end
    ki, ai = ki + 1, ai + 1
  elseif kind == 'K' then
    out[g] = redis.call('ZREM', KEYS[ki], ARGV[ai])
    ki, ai = ki + 1, ai + 1
  else
    return redis.error_reply('complete.lua: unknown guard ' .. kind)
  end
end
return out
