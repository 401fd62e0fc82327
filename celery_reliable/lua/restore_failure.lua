--[[ restore_failure.lua: put back a kept failure that forget_failure.lua took out.

For DeadLetters.replay() when the broker refused the replay: duplicates of the
original keep replaying the failure. Only into a free key: a run that claimed
the key meanwhile (s = P), or finished it, is left alone.

KEYS  [1] the idempotency record
ARGV  [1] fingerprint, [2] payload (error JSON), [3] pttl_ms as forget_failure.lua
      returned it (<= 0: no expiry)
Returns 1 written back, 0 the key was taken meanwhile (left alone).
]]
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 's', 'F', 'f', ARGV[1], 'r', ARGV[2])
local pttl = tonumber(ARGV[3])
if pttl > 0 then
  redis.call('PEXPIRE', KEYS[1], pttl)
end
return 1
