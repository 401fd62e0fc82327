--[[ renew.lua: extend many leases held by one process in ONE round trip (the heartbeat).

A frame, composed at load time (celery_reliable.guards.compose): each guard's
part is the "renew" section of its fragment, celery_reliable/guards/<name>.lua
(L lock, I idempotency, K bulkhead, C breaker probe).
`python -m celery_reliable.guards renew` prints the script.

KEYS  lease keys
ARGV  [1] plan: one letter per key, e.g. "LI"
      then per key: lease value, lease_ms
Returns {r1, r2, ...}: 1 extended, 0 lost (expired or taken over; untouched)
Sent once per heartbeat tick, never resent: the next tick is a new call.

What a guard's section sees: g, its key KEYS[g], its value ARGV[ai], lease_ms
ARGV[ai + 1], now_ms (nil until a section reads TIME into it); it sets out[g].
]]
local plan = ARGV[1]
local out = {}
local now_ms = nil
for g = 1, #plan do
  local kind = string.sub(plan, g, g)
  local ai = 2 * g
  --@guards renew 'renew.lua: unknown lease '
end
return out
