--[[ admit.lua: decide every guard of one task execution, all-or-nothing, in ONE round trip.

KEYS  the keys of each guard, in plan order
        I (idempotency): record key
        L (lock):        lock key, fence key
ARGV  [1] plan: one letter per guard, e.g. "IL"
      then each guard's arguments, in plan order
        I: fingerprint, owner, lease_ms, ttl_ms
        L: owner, lease_ms, fence_ttl_ms
Returns
  {1, r1, r2, ...}          every guard admitted; r_i is guard i's result
                            (I: 1 if a record existed (lease taken over), else 0;
                             L: the fencing token)
  {0, i, retry_after_ms}    guard i (1-based) refused for now
  {2, i, state, payload}    guard i is a finished idempotency record: replay it
  {3, i, fingerprint}       guard i's key was used with other arguments
Unless every guard admits, NOTHING is written. Time is the server's (TIME).

Idempotency record: a hash {s = P|S|F, f = fingerprint, o = owner,
d = lease deadline in ms (P only), r = result or error JSON (S/F)}.
]]
local plan = ARGV[1]
local n = #plan
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)

-- phase 1: check (reads only)
local ki, ai = 1, 2
local existed = {}
for g = 1, n do
  local kind = string.sub(plan, g, g)
  if kind == 'I' then
    local rec = redis.call('HMGET', KEYS[ki], 's', 'f', 'd', 'r')
    existed[g] = 0
    if rec[1] then
      existed[g] = 1
      if rec[2] ~= ARGV[ai] then
        return {3, g, rec[2] or ''}
      end
      if rec[1] == 'S' or rec[1] == 'F' then
        return {2, g, rec[1], rec[4] or ''}
      end
      local deadline = tonumber(rec[3] or '0')
      if deadline > now_ms then
        return {0, g, deadline - now_ms}
      end
      -- an expired lease: its holder died or stalled; take it over
    end
    ki, ai = ki + 1, ai + 4
  elseif kind == 'L' then
    if redis.call('EXISTS', KEYS[ki]) == 1 then
      return {0, g, redis.call('PTTL', KEYS[ki])}
    end
    ki, ai = ki + 2, ai + 3
  else
    return redis.error_reply('admit.lua: unknown guard ' .. kind)
  end
end

-- phase 2: apply (every guard said yes)
local out = {1}
ki, ai = 1, 2
for g = 1, n do
  local kind = string.sub(plan, g, g)
  if kind == 'I' then
    redis.call('HSET', KEYS[ki], 's', 'P', 'f', ARGV[ai], 'o', ARGV[ai + 1],
               'd', now_ms + tonumber(ARGV[ai + 2]))
    redis.call('HDEL', KEYS[ki], 'r')
    redis.call('PEXPIRE', KEYS[ki], ARGV[ai + 3])
    out[#out + 1] = existed[g]
    ki, ai = ki + 1, ai + 4
  elseif kind == 'L' then
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
