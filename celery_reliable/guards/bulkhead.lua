--[[ guards/bulkhead.lua: K, a slot of a bulkhead tier held as a lease (bulkhead.py: plan, release).

admit.lua
  KEYS     slots zset (owner -> lease deadline), waiting zset (waiter -> deadline),
           stats hash
  ARGV     owner, concurrent, lease_ms, waiter id, queue size, timeout_ms,
           policy (wait|drop|fail)
  result   slots now in use
  refusals {0, i, -1}      full, policy wait: the waiter is queued (retry_after unknown)
           {4, i, reason}  rejects for good: drop | fail | queue (too many waiting)
                           | timeout (waited past timeout_ms)
  writes on a refusal: its own bookkeeping (the waiting set, the stats counters)
           and sweeping expired slots
  seen[g]  slots in use (check -> apply)
complete.lua
  KEYS     slots zset
  ARGV     owner
  result   1 released, 0 not ours any more
rollback.lua (_zset_lease.lua)
  KEY      slots zset; OWNER the owner given to admit.lua: its member goes
renew.lua (_zset_lease.lua)
  KEY      slots zset; value = owner; score = now + lease_ms if still a member;
           keeps the zset itself alive at least 2 * lease_ms + 60 s longer
]]

--@ admit.check
clock()
local slots, waiting, stats = KEYS[ki], KEYS[ki + 1], KEYS[ki + 2]
local used = redis.call('ZCARD', slots)
if used >= tonumber(ARGV[ai + 1]) then
  -- looks full: sweep the leases of dead workers, then count again
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
  used = redis.call('ZCARD', slots)
end
seen[g] = used
if used >= tonumber(ARGV[ai + 1]) then
  local policy = ARGV[ai + 6]
  if policy == 'drop' then
    redis.call('HINCRBY', stats, 'dropped', 1)
    return {4, g, 'drop'}
  elseif policy == 'fail' then
    redis.call('HINCRBY', stats, 'rejected', 1)
    return {4, g, 'fail'}
  end
  local waiter = ARGV[ai + 3]
  local deadline = redis.call('ZSCORE', waiting, waiter)
  if deadline then
    if tonumber(deadline) <= now_ms then
      redis.call('ZREM', waiting, waiter)
      redis.call('HINCRBY', stats, 'timed_out', 1)
      return {4, g, 'timeout'}
    end
  else
    -- waiters past their deadline by a minute are gone (their task is)
    redis.call('ZREMRANGEBYSCORE', waiting, '-inf', now_ms - 60000)
    if redis.call('ZCOUNT', waiting, now_ms, '+inf') >= tonumber(ARGV[ai + 4]) then
      redis.call('HINCRBY', stats, 'rejected', 1)
      return {4, g, 'queue'}
    end
    redis.call('ZADD', waiting, now_ms + tonumber(ARGV[ai + 5]), waiter)
    redis.call('PEXPIRE', waiting, tonumber(ARGV[ai + 5]) + 120000)
  end
  return {0, g, -1}
end

--@ admit.apply
clock()
local added = redis.call('ZADD', KEYS[ki], now_ms + tonumber(ARGV[ai + 2]), ARGV[ai])
redis.call('PEXPIRE', KEYS[ki], tonumber(ARGV[ai + 2]) * 2 + 60000)
redis.call('ZREM', KEYS[ki + 1], ARGV[ai + 3])
out[#out + 1] = seen[g] + added

--@ complete
out[g] = redis.call('ZREM', KEYS[ki], ARGV[ai])

--@ rollback
--@include _zset_lease

--@ renew
--@include _zset_lease
