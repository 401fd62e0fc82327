--[[ complete.lua: settle every guard of one finished execution in ONE round trip.

A frame, composed at load time (celery_reliable.guards.compose): each guard's
part is the "complete" section of its fragment, celery_reliable/guards/<name>.lua,
whose header documents its KEYS, ARGV and result.
`python -m celery_reliable.guards complete` prints the script.

KEYS  the keys of each guard, in plan order
ARGV  [1] plan: one letter per guard, e.g. "IL" (I idempotency, L lock,
          K bulkhead, D deliveries, C breaker, W window)
      then each guard's arguments, in plan order
Returns {r1, r2, ...}: 1 settled, 0 not ours any more (expired or taken over;
        left untouched); C: 10 * old state + new state; W: 1 given back, 0 kept
Safe to run twice: the second run finds nothing of ours and changes nothing.

What a guard's section sees: g, its keys KEYS[ki], ... and arguments ARGV[ai], ...
(the frame steps past them, by the guard's layout in GUARDS); it sets out[g].
]]
local plan = ARGV[1]
local out = {}
local ki, ai = 1, 2
for g = 1, #plan do
  local kind = string.sub(plan, g, g)
  --@guards complete 'complete.lua: unknown guard '
end
return out
