--[[ complete.lua: settle every guard of one finished execution in ONE round trip.

KEYS  the keys of each guard, in plan order
        I (idempotency): record key
        L (lock):        lock key
        K (bulkhead):    slots zset
        D (deliveries):  set of unfinished deliveries' owners
        C (breaker):     breaker hash, probes zset
ARGV  [1] plan: one letter per guard, e.g. "IL"
      then each guard's arguments, in plan order
        I: owner, outcome, payload, ttl_ms
           outcome S = succeeded (payload: result JSON), F = failed and kept
           (payload: error JSON), X = forget (nothing happened; a later
           delivery may run)
        L: lease value ("<token> <holder>") as admit.lua wrote it
        K: owner
        D: dead_ttl_ms: the delivery finished: forget the unfinished ones; unless
           0, the task id was dead-lettered: keep (or write) the mark '!dead'
           for dead_ttl_ms, so a redelivery of it does not run (admit.lua)
        C: probe owner, outcome (s success | f failure | n neutral), window,
           failure_threshold, min_calls, success_threshold
Returns {r1, r2, ...}: 1 settled, 0 not ours any more (expired or taken over;
        left untouched); C: 10 * old state + new state
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
  elseif kind == 'D' then
    out[g] = redis.call('DEL', KEYS[ki])
    if ARGV[ai] ~= '0' then  -- dead-lettered: only the mark stays, for its ttl
      redis.call('SADD', KEYS[ki], '!dead')
      redis.call('PEXPIRE', KEYS[ki], ARGV[ai])
    end
    ki, ai = ki + 1, ai + 1
  elseif kind == 'C' then
    local h, probes = KEYS[ki], KEYS[ki + 1]
    local was_probe = redis.call('ZREM', probes, ARGV[ai]) == 1
    local outcome = ARGV[ai + 1]
    local state = tonumber(redis.call('HGET', h, 's') or '0')
    local new = state
    if outcome ~= 'n' then
      if state == 2 and was_probe then
        if outcome == 'f' then
          new = 1
        elseif redis.call('HINCRBY', h, 'ok', 1) >= tonumber(ARGV[ai + 5]) then
          new = 0
        end
      elseif state == 0 then
        local w = (redis.call('HGET', h, 'w') or '') .. outcome
        local size = tonumber(ARGV[ai + 2])
        if #w > size then
          w = string.sub(w, -size)
        end
        local _, fails = string.gsub(w, 'f', '')
        if #w >= tonumber(ARGV[ai + 4]) and fails >= tonumber(ARGV[ai + 3]) then
          new = 1
        else
          redis.call('HSET', h, 'w', w)
        end
      end
      -- results arriving while open, or from non-probes while half-open, are ignored
    end
    if new ~= state then
      if new == 1 then
        local t = redis.call('TIME')
        redis.call('HSET', h, 's', 1, 'o', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
                   'w', '', 'ok', 0)
      else
        redis.call('HSET', h, 's', 0, 'w', '', 'ok', 0)
      end
    end
    out[g] = 10 * state + new
    ki, ai = ki + 2, ai + 6
  else
    return redis.error_reply('complete.lua: unknown guard ' .. kind)
  end
end
return out
