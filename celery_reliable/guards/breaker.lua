--[[ guards/breaker.lua: C, a circuit breaker (breaker.py: plan, release).

The breaker hash: s = 0 closed | 1 open | 2 half-open, o = when it opened (server ms),
h = when it half-opened, w = the window of recent outcomes (s/f), ok = successful
probes while half-open. The probes zset: probe owner -> lease deadline.

admit.lua
  KEYS     breaker hash, probes zset
  ARGV     open_ms, half_open_max, probe owner, probe_lease_ms
  result   0 closed, 1 a half-open probe, 2 a probe that just half-opened the breaker
  refusals {0, i, ms}  open: until it half-opens; half-open with every probe out:
                       max(1 s, time since it half-opened)
  writes on a refusal: sweeping dead probes
complete.lua
  KEYS     breaker hash, probes zset
  ARGV     probe owner, outcome (s success | f failure | n neutral), window,
           failure_threshold, min_calls, success_threshold
  result   10 * old state + new state
rollback.lua (_zset_lease.lua)
  KEY      probes zset; OWNER the probe owner given to admit.lua: its member goes
renew.lua (_zset_lease.lua)
  KEY      probes zset; value = probe owner; score = now + lease_ms if still a
           member (a probe slower than its lease stays the probe); keeps the zset
           itself alive at least 2 * lease_ms + 60 s longer
]]

--@ admit.check
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

--@ admit.apply
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

--@ complete
local h, probes = KEYS[ki], KEYS[ki + 1]
local was_probe = redis.call('ZREM', probes, ARGV[ai]) == 1
local outcome = ARGV[ai + 1]
local state = tonumber(redis.call('HGET', h, 's') or '0')
local new = state
if outcome ~= 'n' then
  if state == 2 and was_probe then
    if outcome == 'f' then
      new = 1
    elseif redis.call('HINCRBY', h, 'ok', 1) >= tonumber(ARGV[ai + 5]) then
      new = 0
    end
  elseif state == 0 then
    local w = (redis.call('HGET', h, 'w') or '') .. outcome
    local size = tonumber(ARGV[ai + 2])
    if #w > size then
      w = string.sub(w, -size)
    end
    local _, fails = string.gsub(w, 'f', '')
    if #w >= tonumber(ARGV[ai + 4]) and fails >= tonumber(ARGV[ai + 3]) then
      new = 1
    else
      redis.call('HSET', h, 'w', w)
    end
  end
  -- results arriving while open, or from non-probes while half-open, are ignored
end
if new ~= state then
  if new == 1 then
    local t = redis.call('TIME')
    redis.call('HSET', h, 's', 1, 'o', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
               'w', '', 'ok', 0)
  else
    redis.call('HSET', h, 's', 0, 'w', '', 'ok', 0)
  end
end
out[g] = 10 * state + new

--@ rollback
--@include _zset_lease

--@ renew
--@include _zset_lease
