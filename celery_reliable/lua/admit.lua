--[[ admit.lua: decide every guard of one task execution, all-or-nothing, in ONE round trip.

A frame, composed at load time (celery_reliable.guards.compose): each guard's
check and apply are sections of its fragment, celery_reliable/guards/<name>.lua,
whose header documents its KEYS, ARGV, result and refusals; they go in place of
the two directive lines below. `python -m celery_reliable.guards admit` prints
the script.

KEYS  the keys of each guard, in plan order, then LAST this request's rollback
      marker (Plan.admit: a fresh random name per request, in the plan's hash
      tag), which rollback.lua writes when the client gave up on the request
ARGV  [1] plan: one letter per guard, e.g. "ILKB" (celery_reliable.guards.GUARDS:
          I idempotency, L lock, K bulkhead, D deliveries, C breaker, B bucket)
      then each guard's arguments, in plan order
Returns
  {1, r1, r2, ...}          every guard admitted; r_i is guard i's result
  {0, i, retry_after_ms}    guard i (1-based) refused for now (-1: unknown)
  {0, i, retry_after_ms, slot}  a bucket refused: the task's slot in its queue
                            (queue clock), to pass back as its slot next time
  {2, i, state, payload}    guard i is a finished idempotency record: replay it
  {3, i, fingerprint}       guard i's key was used with other arguments
  {4, i, reason}            guard i rejects for good: a full bulkhead's
                            drop | fail | queue (too many waiting) | timeout
  {5, i, deliveries}        guard i: the task was delivered and never finished more
                            than max_redeliveries times (its workers died): poison
  {7, i}                    guard i (D): this task id was dead-lettered; a redelivery
                            of its last delivery (its ack was lost) must not run
  {6}                       this request was rolled back before it arrived (it
                            was delayed in the network past its client's
                            timeout): nothing is checked or written
The marker is checked first, before any guard: a request that arrives after its
rollback (which found nothing to undo) would otherwise take a lock, a slot or a
delivery entry that nobody owns. Costs one EXISTS per admission.
Unless every guard admits, no token, slot, lock or record is taken. The only
writes on a refusal are the bookkeeping a guard's header lists under "writes on
a refusal" (a full bulkhead's waiting set and counters and its expired slots, a
bucket's queue, a breaker's dead probes, a window's turns). Time is the server's (TIME).

What a guard's sections see: g (its place in the plan, 1-based), its keys
KEYS[ki], KEYS[ki + 1], ... and arguments ARGV[ai], ARGV[ai + 1], ... (the frame
steps past them, by the guard's layout in GUARDS), clock() (then now_us, now_ms),
seen[g] (what its check leaves for its apply) and, in apply, out (append its result).
]]
local plan = ARGV[1]
local n = #plan
-- The server clock, read once and only by guards that need it (TIME costs a
-- few microseconds per call).
local now_us, now_ms
local function clock()
  if not now_us then
    local t = redis.call('TIME')
    now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
    now_ms = math.floor(now_us / 1000)
  end
end

-- phase 0: a request whose client gave up and rolled it back does nothing (it
-- reached Redis late: a segment in retransmission, a stalled server or proxy)
if redis.call('EXISTS', KEYS[#KEYS]) == 1 then
  return {6}
end

-- phase 1: check (reads only)
local ki, ai = 1, 2
local seen = {}  -- per guard: what its check read, for its apply
for g = 1, n do
  local kind = string.sub(plan, g, g)
  --@guards admit.check 'admit.lua: unknown guard '
end

-- phase 2: apply (every guard said yes)
local out = {1}
ki, ai = 1, 2
for g = 1, n do
  local kind = string.sub(plan, g, g)
  --@guards admit.apply
end
return out
