--[[ guards/lock.lua: L, a lock that mints fencing tokens (lock.py: plan, release; FencedLock).

admit.lua
  KEYS     lock key, fence key
  ARGV     holder, lease_ms, fence_ttl_ms; the lock's value becomes
           "<token> <holder>", holder = "<owner>" or "<owner>\n<task name>\n<label>"
           (then "\n<nonce>" for a FencedLock: one per acquire)
           (lock.lock_holder: what `reliable locks` shows, kept in the
           lease so it lives, renews and goes with it); fence_ttl_ms: the
           fencing counter's TTL, reset by every acquire
  result   the fencing token
  refusals {0, i, PTTL of the lock}  it is held
complete.lua
  KEYS     lock key
  ARGV     lease value ("<token> <holder>") as admit.lua wrote it
  result   1 released, 0 not ours any more (expired or taken over; left untouched)
rollback.lua
  KEY      lock key; OWNER the holder given to admit.lua
  removes  the lease value is "<token> <holder>"; the token is not known here, so
           the holder after the token is compared. The fencing counter keeps the
           token the admission minted: a skipped token is harmless.
renew.lua
  KEY      lock key; value "<token> <holder>" as admit.lua wrote it; PEXPIRE if
           still ours
]]

--@ admit.check
if redis.call('EXISTS', KEYS[ki]) == 1 then
  return {0, g, redis.call('PTTL', KEYS[ki])}
end

--@ admit.apply
-- The token is strictly greater than every token minted before for this
-- resource: the larger of the last token + 1 and the server clock in
-- microseconds, written back as the counter. Redis can bring back an OLDER
-- counter (a restart from an RDB/AOF snapshot, a failover to a replica that
-- lagged) or none at all (expired, restart without persistence): the tokens
-- minted since then were clock readings (a resource is locked far less
-- often than once per microsecond), so the clock now is past all of them,
-- as long as it did not step back by more than the time between the loss
-- and this acquire. Every acquire resets the counter's TTL: it expires only
-- after fence_ttl without an acquire. Costs one TIME and one SET per acquire.
clock()
local last = tonumber(redis.call('GET', KEYS[ki + 1]) or '0')
local token = math.max(last + 1, now_us)
local tok = string.format('%.0f', token)
redis.call('SET', KEYS[ki + 1], tok, 'PX', ARGV[ai + 2])
redis.call('SET', KEYS[ki], tok .. ' ' .. ARGV[ai], 'PX', ARGV[ai + 1])
out[#out + 1] = token

--@ complete
if redis.call('GET', KEYS[ki]) == ARGV[ai] then
  redis.call('DEL', KEYS[ki])
  out[g] = 1
else
  out[g] = 0
end

--@ rollback
local value = redis.call('GET', key)
if value then
  local token = string.match(value, '^%d+ ')
  if token and string.sub(value, #token + 1) == owner then
    redis.call('DEL', key)
    removed = 1
  end
end

--@ renew
if redis.call('GET', KEYS[g]) == ARGV[ai] then
  redis.call('PEXPIRE', KEYS[g], ARGV[ai + 1])
  out[g] = 1
else
  out[g] = 0
end
