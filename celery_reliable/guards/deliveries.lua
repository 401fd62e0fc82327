--[[ guards/deliveries.lua: D, poison-message counting (deliveries.py: plan, release).

The key is a set of the execution owners of this task id's deliveries that started
and never finished; '!dead' once the task id is dead-lettered (complete.lua keeps it).

admit.lua
  KEYS     the task id's deliveries set
  ARGV     max_redeliveries, ttl_ms, owner
  result   deliveries so far (this one included)
  refusals {5, i, deliveries}  delivered and never finished more than
                               max_redeliveries times (its workers died): poison
           {7, i}              this task id was dead-lettered; a redelivery of its
                               last delivery (its ack was lost) must not run
  seen[g]  an older version's counter (a string), converted to a set in apply
complete.lua
  KEYS     the deliveries set
  ARGV     dead_ttl_ms: the delivery finished: forget the unfinished ones; unless
           0, the task id was dead-lettered: keep (or write) the mark '!dead'
           for dead_ttl_ms, so a redelivery of it does not run (admit.lua).
           With 0, a mark already there (another delivery of the task id,
           running at the same time, dead-lettered it) stays as it is
  result   1 forgotten, 0 nothing there (or a mark that stays)
rollback.lua
  KEY      the deliveries set; OWNER the owner given to admit.lua: its member goes
           (an older version's counter is a string: left alone)
]]

--@ admit.check
-- A set of owners, so a rolled-back admission (rollback.lua) can take its own
-- entry out; an older version kept a counter (a string): read it, convert it
-- in phase 2.
local count = redis.pcall('SCARD', KEYS[ki])
if type(count) == 'table' then
  count = tonumber(redis.call('GET', KEYS[ki]) or '0')
  seen[g] = count
end
-- A dead-lettered task id ('!dead', written with its dead letter): this is a
-- redelivery of a delivery whose failure was final (its ack was lost, e.g. the
-- broker died before it arrived). Only checked when the set exists: free for
-- a first delivery.
if count > 0 and seen[g] == nil and redis.call('SISMEMBER', KEYS[ki], '!dead') == 1 then
  return {7, g}
end
if count > tonumber(ARGV[ai]) then
  return {5, g, count}
end

--@ admit.apply
if seen[g] then  -- an older version's counter: keep its count (<= max_redeliveries)
  redis.call('DEL', KEYS[ki])
  for i = 1, seen[g] do
    redis.call('SADD', KEYS[ki], 'legacy:' .. i)
  end
end
redis.call('SADD', KEYS[ki], ARGV[ai + 2])
redis.call('PEXPIRE', KEYS[ki], ARGV[ai + 1])
out[#out + 1] = redis.call('SCARD', KEYS[ki])

--@ complete
if ARGV[ai] ~= '0' then  -- dead-lettered: only the mark stays, for its ttl
  out[g] = redis.call('DEL', KEYS[ki])
  redis.call('SADD', KEYS[ki], '!dead')
  redis.call('PEXPIRE', KEYS[ki], ARGV[ai])
elseif redis.pcall('SISMEMBER', KEYS[ki], '!dead') == 1 then
  -- another delivery of this task id, running at the same time (the broker
  -- gave the message out again while this one ran), dead-lettered it
  -- meanwhile: its mark stays, with its ttl (and nothing else is left in the
  -- set: the mark replaced it)
  out[g] = 0
else
  out[g] = redis.call('DEL', KEYS[ki])
end

--@ rollback
if redis.call('TYPE', key).ok == 'set' then
  removed = redis.call('SREM', key, owner)
end
