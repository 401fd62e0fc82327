--[[ guards/idempotency.lua: I, the idempotency record of one call (idempotency.py: plan, release).

The record is a hash {s = P|S|F, f = fingerprint, o = owner, d = lease deadline in ms
(P only), r = result or error JSON (S/F)}; PostgreSQL (when configured) has the last word.
Put first in a plan: a finished record replays even when other guards would refuse.

admit.lua
  KEYS     record key
  ARGV     fingerprint, owner, lease_ms, ttl_ms
  result   1 if a record existed (an expired lease, taken over), else 0
  refusals {0, i, ms until the lease's deadline}  another execution holds the lease
           {2, i, state, payload}  a finished record (S or F): replay it
           {3, i, fingerprint}     the key was recorded with other arguments
  seen[g]  whether a record existed (check -> apply)
complete.lua
  KEYS     record key
  ARGV     owner, outcome, payload, ttl_ms
           outcome S = succeeded (payload: result JSON), F = failed and kept
           (payload: error JSON), X = forget (nothing happened; a later
           delivery may run)
  result   1 settled, 0 not ours any more (expired or taken over; left untouched)
rollback.lua
  KEY      record key; OWNER the owner given to admit.lua
  removes  only an in-progress record (s = P) of ours; a finished one is a result
renew.lua
  KEY      record key; value = owner; deadline = now + lease_ms if still ours (and
           the record's TTL raised to 2 * lease_ms: a run longer than the record's
           TTL must not lose the record mid-run)
]]

--@ admit.check
clock()
local rec = redis.call('HMGET', KEYS[ki], 's', 'f', 'd', 'r')
seen[g] = 0
if rec[1] then
  seen[g] = 1
  if rec[1] == 'S' or rec[1] == 'F' then
    if rec[2] ~= ARGV[ai] then
      return {3, g, rec[2] or ''}
    end
    return {2, g, rec[1], rec[4] or ''}
  end
  local deadline = tonumber(rec[3] or '0')
  if deadline > now_ms then
    if rec[2] ~= ARGV[ai] then
      return {3, g, rec[2] or ''}
    end
    return {0, g, deadline - now_ms}
  end
  -- an expired lease: its holder died or stalled, nothing was recorded
  -- here; take it over (PostgreSQL still has the last word)
end

--@ admit.apply
clock()
redis.call('HSET', KEYS[ki], 's', 'P', 'f', ARGV[ai], 'o', ARGV[ai + 1],
           'd', now_ms + tonumber(ARGV[ai + 2]))
redis.call('HDEL', KEYS[ki], 'r')
redis.call('PEXPIRE', KEYS[ki], ARGV[ai + 3])
out[#out + 1] = seen[g]

--@ complete
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

--@ rollback
local rec = redis.call('HMGET', key, 's', 'o')
if rec[1] == 'P' and rec[2] == owner then
  redis.call('DEL', key)
  removed = 1
end

--@ renew
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
