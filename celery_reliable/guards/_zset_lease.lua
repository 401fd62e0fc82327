--[[ guards/_zset_lease.lua: a lease held as a member of a sorted set (owner -> deadline).

Shared, not a guard: a guard's section pulls in the section of the same name with
the line `--@include _zset_lease` (guards.compose). Bulkhead slots (K) and
breaker probes (C) are such leases.

rollback.lua
  KEY      the sorted set; OWNER the owner given to admit.lua: its member goes
renew.lua
  KEY      the sorted set; value = owner; score = now + lease_ms if still a member;
           keeps the set itself alive at least 2 * lease_ms + 60 s longer
]]

--@ rollback
removed = redis.call('ZREM', key, owner)

--@ renew
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
