--[[ forget_failure.lua: take out a KEPT FAILURE of an idempotency record, nothing else.

DeadLetters.replay() runs this before it re-publishes a dead-lettered task with
the same idempotency key, so that the replay runs instead of replaying the
failure (idempotency_keep_failures). A record in progress (s = P) or succeeded
(s = S) is left alone: a run owns it, or the effect already happened and the
replay replays it.

KEYS  [1] the idempotency record (a hash, see admit.lua)
ARGV  (none)
Returns {fingerprint, payload, pttl_ms} of the failure it deleted (pttl_ms -1:
        no expiry), to write back with restore_failure.lua if the replay cannot
        be published; {} when there was no kept failure.
Safe to run twice: the second run finds nothing to take.
]]
local rec = redis.call('HMGET', KEYS[1], 's', 'f', 'r')
if rec[1] ~= 'F' then
  return {}
end
local pttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
return {rec[2] or '', rec[3] or '', pttl}
