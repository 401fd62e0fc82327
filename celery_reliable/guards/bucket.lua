--[[ guards/bucket.lua: B, a token bucket with a queue of the refused (bucket.py: plan).

The bucket hash: t = tokens, ts = when they were counted (server ms), q = the queue's
tail, r = the rate the queue was scheduled at, a, b = the queue's clock (below).
Nothing to complete, roll back or renew: tokens are not refunded (see Plan.rollback).

admit.lua
  KEYS     bucket hash
  ARGV     rate (tokens/s), burst (tokens), cost (tokens), slot: -1 a plain
           take that never queues (retry budget), 0 a fresh arrival, > 0 the
           slot this task was given in the bucket's queue before (a point of
           the queue's clock: server ms until the bucket's rate changes)
  result   whole tokens left
  refusals {0, i, retry_after_ms, slot}  the task's slot in the bucket's queue
                                         (queue clock), to pass back as its slot
           {0, i, retry_after_ms}        a plain take (slot -1): no queue
  writes on a refusal: the queue (its tail q; its clock r, a, b on a rate change)
  seen[g]  {tokens, ts, queue tail in server ms} as read by the check
]]

--@ admit.check
clock()
local b = redis.call('HMGET', KEYS[ki], 't', 'ts', 'q', 'r', 'a', 'b')
local rate, burst, cost = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
local slot = tonumber(ARGV[ai + 3])
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if not tokens then
  tokens, ts = burst, now_ms
end
local avail = tokens
if now_ms > ts then
  avail = math.min(burst, tokens + (now_ms - ts) * rate / 1000)
end
-- A virtual queue of the refused, q its tail: each refused task gets the
-- next free slot, one token's time apart, and keeps it (its message carries
-- it back, as slot) however often it is deferred before its turn, since a
-- deferral is capped by the broker's redelivery window. Bookkeeping only:
-- no token is reserved, so a slot lost with its task costs nothing but
-- that token's time (unused tokens pile up to burst as usual).
--
-- Places (q, slots) are points of the queue's own clock v, server ms =
-- va + vb * v (fields a, b; the identity until the rate changes). An
-- arrival whose rate differs from the rate the queue was scheduled at
-- (field r) rescales every distance still ahead by r / rate around now
-- (va, vb change; places do not): turns still ahead follow the new rate, in
-- the same order, and the slots already handed out follow, read through
-- the same clock, when their tasks ask again (one sleeping in an ETA
-- message to its old turn asks only then). (Tasks sharing a key with different rates: the queue
-- runs at the rate of the latest arrival.)
local va, vb = tonumber(b[5] or '0'), tonumber(b[6] or '1')
local issued = tonumber(b[4] or '')
local q = tonumber(b[3] or '0')
if issued and issued ~= rate then
  local f = issued / rate
  va, vb = now_ms + (va - now_ms) * f, vb * f
  redis.call('HSET', KEYS[ki], 'r', ARGV[ai], 'a', string.format('%.17g', va),
             'b', string.format('%.17g', vb))
  local keep = math.ceil(va + vb * q - now_ms + burst * 1000 / rate) + 1000
  if redis.call('PTTL', KEYS[ki]) < keep then
    redis.call('PEXPIRE', KEYS[ki], keep)
  end
end
local qr = va + vb * q  -- the tail, server ms
local step = cost * 1000 / rate
-- A queue that does not drain is dead: each queued task takes a token at
-- its turn, so while one is alive the bucket never stays full. If nobody
-- took a token since it filled up again (plus a grace of two steps and 2 s
-- for late comebacks), its tasks are gone (purged, revoked, expired) and
-- the queue is dropped: fresh arrivals take the tokens again, and a slot of
-- it that comes back after all is voided below (fresh). A lost queue thus
-- costs at most: arrivals within that time of the last take wait behind
-- it until their slot or the cap, whichever is sooner.
if qr > now_ms and now_ms > ts + math.max(0, burst - tokens) * 1000 / rate
                              + 2 * step + 2000 then
  q, qr = (now_ms - va) / vb, now_ms
  redis.call('HSET', KEYS[ki], 'q', q)
end
seen[g] = {tokens, ts, qr}
if slot > 0 and q <= slot then
  slot = 0  -- q only grows past every slot it gave: this bucket lost its queue
end
if slot > 0 and va + vb * slot > now_ms then
  -- its turn has not come: come back then, in the same place (q unchanged)
  return {0, g, math.ceil(va + vb * slot - now_ms), slot}
end
if slot == 0 and qr > now_ms then
  -- a queue exists: a fresh arrival takes no token ahead of it (the tokens
  -- that build up while it drains are for the queued, in slot order)
  redis.call('HSET', KEYS[ki], 'q', q + step / vb, 'r', ARGV[ai])
  redis.call('PEXPIRE', KEYS[ki], math.ceil(qr - now_ms + burst * 1000 / rate) + 1000)
  return {0, g, math.ceil(qr - now_ms), q}
end
if avail < cost then
  local wait = (cost - avail) * 1000 / rate
  if ts > now_ms then
    wait = wait + (ts - now_ms)  -- throttled until ts
  end
  if slot < 0 then
    return {0, g, math.ceil(wait)}  -- a plain take: no queue
  end
  if slot > 0 then
    -- its turn came but an earlier one took the token: retry when the next
    -- is there, still ahead of fresh arrivals (q moves behind it)
    if qr < now_ms + wait + step then
      redis.call('HSET', KEYS[ki], 'q', (now_ms + wait + step - va) / vb, 'r', ARGV[ai])
      redis.call('PEXPIRE', KEYS[ki], math.ceil(wait + burst * 1000 / rate) + 1000)
    end
    return {0, g, math.ceil(wait), slot}
  end
  local at = now_ms + wait  -- qr <= now_ms here: the queue is empty
  redis.call('HSET', KEYS[ki], 'q', (at + step - va) / vb, 'r', ARGV[ai])
  redis.call('PEXPIRE', KEYS[ki], math.ceil(at - now_ms + burst * 1000 / rate) + 1000)
  return {0, g, math.ceil(at - now_ms), (at - va) / vb}
end

--@ admit.apply
clock()
-- refill, take, store, expire when full again (from the state phase 1 read)
local rate, burst, cost = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
local tokens, ts, q = seen[g][1], seen[g][2], seen[g][3]
if now_ms > ts then
  tokens = math.min(burst, tokens + (now_ms - ts) * rate / 1000)
end
tokens = tokens - cost
redis.call('HSET', KEYS[ki], 't', tostring(tokens), 'ts', math.max(ts, now_ms),
           'r', ARGV[ai])
-- expire when full again, also after the last queued slot (q - one step) took its token
local ttl = math.max((burst - tokens) * 1000 / rate,
                     q - cost * 1000 / rate - now_ms + burst * 1000 / rate)
redis.call('PEXPIRE', KEYS[ki], math.ceil(ttl) + 1000)
out[#out + 1] = math.floor(tokens)
