--[[ admit.lua: decide every guard of one task execution, all-or-nothing, in ONE round trip.

KEYS  the keys of each guard, in plan order, then LAST this request's rollback
      marker (Plan.admit: a fresh random name per request, in the plan's hash
      tag), which rollback.lua writes when the client gave up on the request
        I (idempotency): record key
        L (lock):        lock key, fence key
        K (bulkhead):    slots zset, waiting zset, stats hash
        B (bucket):      bucket hash
        D (deliveries):  set of the execution owners of this task id's deliveries
                         that started and never finished; '!dead' once the
                         task id is dead-lettered (complete.lua keeps it)
        C (breaker):     breaker hash, probes zset
ARGV  [1] plan: one letter per guard, e.g. "ILKB"
      then each guard's arguments, in plan order
        I: fingerprint, owner, lease_ms, ttl_ms
        L: holder, lease_ms, fence_ttl_ms; the lock's value becomes
           "<token> <holder>", holder = "<owner>" or "<owner>\n<task name>\n<label>"
           (then "\n<nonce>" for a FencedLock: one per acquire)
           (admission.lock_holder: what `reliable locks` shows, kept in the
           lease so it lives, renews and goes with it); fence_ttl_ms: the
           fencing counter's TTL, reset by every acquire
        K: owner, concurrent, lease_ms, waiter id, queue size, timeout_ms,
           policy (wait|drop|fail)
        B: rate (tokens/s), burst (tokens), cost (tokens), slot: -1 a plain
           take that never queues (retry budget), 0 a fresh arrival, > 0 the
           slot this task was given in the bucket's queue before (a point of
           the queue's clock: server ms until the bucket's rate changes)
        D: max_redeliveries, ttl_ms, owner
        C: open_ms, half_open_max, probe owner, probe_lease_ms
           (refused while open: retry_after = until it half-opens; while half-open
           with every probe out: max(1 s, time since it half-opened))
Returns
  {1, r1, r2, ...}          every guard admitted; r_i is guard i's result
                            (I: 1 if a record existed (lease taken over), else 0;
                             L: the fencing token; K: slots now in use;
                             B: whole tokens left; D: deliveries so far;
                             C: 0 closed, 1 a half-open probe, 2 a probe
                             that just half-opened the breaker)
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
writes on a refusal are a full bulkhead's own bookkeeping (its waiting set
and counters), sweeping expired slots and a bucket's queue (its tail q; its
clock r, a, b on a rate change). Time is
the server's (TIME).

Idempotency record: a hash {s = P|S|F, f = fingerprint, o = owner,
d = lease deadline in ms (P only), r = result or error JSON (S/F)}.
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
local existed = {}
local seen = {}  -- K: slots in use; B: {tokens, ts} as read in phase 1
for g = 1, n do
  local kind = string.sub(plan, g, g)
  if kind == 'I' then
    clock()
    local rec = redis.call('HMGET', KEYS[ki], 's', 'f', 'd', 'r')
    existed[g] = 0
    if rec[1] then
      existed[g] = 1
      if rec[1] == 'S' or rec[1] == 'F' then
        if rec[2] ~= ARGV[ai] then
          return {3, g, rec[2] or ''}
        end
        return {2, g, rec[1], rec[4] or ''}
      end
      local deadline = tonumber(rec[3] or '0')
      if deadline > now_ms then
        if rec[2] ~= ARGV[ai] then
          return {3, g, rec[2] or ''}
        end
        return {0, g, deadline - now_ms}
      end
      -- an expired lease: its holder died or stalled, nothing was recorded
      -- here; take it over (PostgreSQL still has the last word)
    end
    ki, ai = ki + 1, ai + 4
  elseif kind == 'L' then
    if redis.call('EXISTS', KEYS[ki]) == 1 then
      return {0, g, redis.call('PTTL', KEYS[ki])}
    end
    ki, ai = ki + 2, ai + 3
  elseif kind == 'K' then
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
    ki, ai = ki + 3, ai + 7
  elseif kind == 'D' then
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
    ki, ai = ki + 1, ai + 3
  elseif kind == 'C' then
    clock()
    local st = redis.call('HMGET', KEYS[ki], 's', 'o', 'h')
    local state = tonumber(st[1] or '0')
    local since = tonumber(st[3] or '0')  -- when it half-opened (server ms)
    if state == 1 then
      local reopen = tonumber(st[2] or '0') + tonumber(ARGV[ai])
      if now_ms < reopen then
        return {0, g, reopen - now_ms}  -- come back when it half-opens
      end
      state, since = 2, reopen  -- open long enough: half-open (written in phase 2)
    end
    if state == 2 then
      redis.call('ZREMRANGEBYSCORE', KEYS[ki + 1], '-inf', now_ms)  -- dead probes
      if redis.call('ZCARD', KEYS[ki + 1]) >= tonumber(ARGV[ai + 1]) then
        -- the probes are out: ask again after as long as they have been out (at
        -- least 1 s), so a waiting task is at most about twice the probes' time late
        -- and a crowd of waiting tasks does not poll the probes every second
        -- (no 'h': half-opened by an older version of this script; ask again in 1 s)
        return {0, g, math.max(1000, since > 0 and now_ms - since or 0)}
      end
    end
    ki, ai = ki + 2, ai + 4
  elseif kind == 'B' then
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
    ki, ai = ki + 1, ai + 4
  else
    return redis.error_reply('admit.lua: unknown guard ' .. kind)
  end
end

-- phase 2: apply (every guard said yes)
local out = {1}
ki, ai = 1, 2
for g = 1, n do
  local kind = string.sub(plan, g, g)
  if kind == 'I' then
    clock()
    redis.call('HSET', KEYS[ki], 's', 'P', 'f', ARGV[ai], 'o', ARGV[ai + 1],
               'd', now_ms + tonumber(ARGV[ai + 2]))
    redis.call('HDEL', KEYS[ki], 'r')
    redis.call('PEXPIRE', KEYS[ki], ARGV[ai + 3])
    out[#out + 1] = existed[g]
    ki, ai = ki + 1, ai + 4
  elseif kind == 'L' then
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
    ki, ai = ki + 2, ai + 3
  elseif kind == 'K' then
    clock()
    local added = redis.call('ZADD', KEYS[ki], now_ms + tonumber(ARGV[ai + 2]), ARGV[ai])
    redis.call('PEXPIRE', KEYS[ki], tonumber(ARGV[ai + 2]) * 2 + 60000)
    redis.call('ZREM', KEYS[ki + 1], ARGV[ai + 3])
    out[#out + 1] = seen[g] + added
    ki, ai = ki + 3, ai + 7
  elseif kind == 'D' then
    if seen[g] then  -- an older version's counter: keep its count (<= max_redeliveries)
      redis.call('DEL', KEYS[ki])
      for i = 1, seen[g] do
        redis.call('SADD', KEYS[ki], 'legacy:' .. i)
      end
    end
    redis.call('SADD', KEYS[ki], ARGV[ai + 2])
    redis.call('PEXPIRE', KEYS[ki], ARGV[ai + 1])
    out[#out + 1] = redis.call('SCARD', KEYS[ki])
    ki, ai = ki + 1, ai + 3
  elseif kind == 'C' then
    clock()
    local st = redis.call('HMGET', KEYS[ki], 's', 'o')
    local state = tonumber(st[1] or '0')
    local became = 0
    if state == 1 then  -- phase 1 found it may half-open now
      redis.call('HSET', KEYS[ki], 's', 2, 'ok', 0, 'h', now_ms)
      state, became = 2, 1
    end
    if state == 2 then
      redis.call('ZADD', KEYS[ki + 1], now_ms + tonumber(ARGV[ai + 3]), ARGV[ai + 2])
      redis.call('PEXPIRE', KEYS[ki + 1], tonumber(ARGV[ai + 3]) + 60000)
      out[#out + 1] = 1 + became  -- 2: this probe half-opened the breaker
    else
      out[#out + 1] = 0
    end
    ki, ai = ki + 2, ai + 4
  elseif kind == 'B' then
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
    ki, ai = ki + 1, ai + 4
  end
end
return out
