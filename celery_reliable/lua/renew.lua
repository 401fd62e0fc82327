--[[ renew.lua: extend many leases held by one process in ONE round trip (the heartbeat).

KEYS  lease keys
ARGV  [1] plan: one letter per key, e.g. "LI"
      then per key: lease value, lease_ms
        L: lock key; value "<token> <holder>" as admit.lua wrote it; PEXPIRE if still ours
        I: idempotency record; value = owner; deadline = now + lease_ms if still ours
        K: bulkhead slots zset; value = owner; score = now + lease_ms if still a member
        C: half-open probes zset of a breaker; value = probe owner; score = now + lease_ms
           if still a member (a probe slower than its lease stays the probe)
        K and C also keep the zset itself alive at least 2 * lease_ms + 60 s longer.
Returns {r1, r2, ...}: 1 extended, 0 lost (expired or taken over; untouched)
Sent once per heartbeat tick, never resent: the next tick is a new call.
]]
local plan = ARGV[1]
local out = {}
local now_ms = nil
for g = 1, #plan do
  local kind = string.sub(plan, g, g)
  local ai = 2 * g
  if kind == 'L' then
    if redis.call('GET', KEYS[g]) == ARGV[ai] then
      redis.call('PEXPIRE', KEYS[g], ARGV[ai + 1])
      out[g] = 1
    else
      out[g] = 0
    end
  elseif kind == 'I' then
    if redis.call('HGET', KEYS[g], 'o') == ARGV[ai] then
      if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      redis.call('HSET', KEYS[g], 'd', now_ms + tonumber(ARGV[ai + 1]))
      -- a run longer than the record's TTL must not lose the record mid-run
      if redis.call('PTTL', KEYS[g]) < 2 * tonumber(ARGV[ai + 1]) then
        redis.call('PEXPIRE', KEYS[g], 2 * tonumber(ARGV[ai + 1]))
      end
      out[g] = 1
    else
      out[g] = 0
    end
  elseif kind == 'K' or kind == 'C' then
    if redis.call('ZSCORE', KEYS[g], ARGV[ai]) then
      if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      local lease_ms = tonumber(ARGV[ai + 1])
      redis.call('ZADD', KEYS[g], 'XX', now_ms + lease_ms, ARGV[ai])
      if redis.call('PTTL', KEYS[g]) < 2 * lease_ms + 60000 then
        redis.call('PEXPIRE', KEYS[g], 2 * lease_ms + 60000)
      end
      out[g] = 1
    else
      out[g] = 0
    end
  else
    return redis.error_reply('renew.lua: unknown lease ' .. kind)
  end
end
return out
