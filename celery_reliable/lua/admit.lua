--[[ admit.lua: decide every guard of one task execution, all-or-nothing, in ONE round trip.

KEYS  the keys of each guard, in plan order
        L (lock): lock key, fence key
ARGV  [1] plan: one letter per guard, e.g. "L"
      then each guard's arguments, in plan order
        L: owner, lease_ms, fence_ttl_ms
Returns
  {1, r1, r2, ...}        every guard admitted; r_i is guard i's result
                          (L: the fencing token, an integer)
  {0, i, retry_after_ms}  guard i (1-based) refused; NOTHING was written
Phase 1 only reads; phase 2 only runs when every guard said yes.
Time is the server's (TIME), never a client's.
]]
local plan = ARGV[1]
local n = #plan
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- phase 1: check
local ki, ai = 1, 2
for g = 1, n do
  local kind = string.sub(plan, g, g)
  if kind == 'L' then
    if redis.call('EXISTS', KEYS[ki]) == 1 then
      return {0, g, redis.call('PTTL', KEYS[ki])}
    end
    ki, ai = ki + 2, ai + 3
  else
    return redis.error_reply('admit.lua: unknown guard ' .. kind)
  end
end

-- phase 2: apply
local out = {1}
ki, ai = 1, 2
for g = 1, n do
  local kind = string.sub(plan, g, g)
  if kind == 'L' then
    -- The token is strictly greater than every token minted before for this
    -- resource, and never below the server clock in microseconds: after the
    -- fence key expires or Redis loses it, tokens still only grow (as long as
    -- the server clock does not step back).
    local last = tonumber(redis.call('GET', KEYS[ki + 1]) or '0')
    local token = math.max(last + 1, now_us)
    local tok = string.format('%.0f', token)
    redis.call('SET', KEYS[ki], tok .. ' ' .. ARGV[ai], 'PX', ARGV[ai + 1])
    redis.call('SET', KEYS[ki + 1], tok, 'PX', ARGV[ai + 2])
    out[#out + 1] = token
    ki, ai = ki + 2, ai + 3
  end
end
return out
