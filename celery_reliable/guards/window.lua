--[[ guards/window.lua: W, a sliding-window limit: at most N admissions in any w ms.

Mode 'e' (exact): KEYS is a sorted set, a log of admissions: member the
execution's owner, score the server ms it was admitted. The window at now is
(now - w, now]; an admission leaves it w ms after it was made. Admitted while
fewer than N members are in the window, so no window of w ms ever holds more
than N. Members that left the window are pruned by the next admission; the key
expires w ms after the last one. Size: at most N members in the window, plus
those that left it since the last admission (at most N).

Mode 'a' (approximate): KEYS is a hash of two fixed-window counts, fields
i = the index of the current fixed window floor(now / w), c = its count, p =
the count of window i - 1. With e = now - i * w (ms into the current window),
an execution is admitted while p * (w - e) / w + c + 1 <= N (the previous
window's count weighted by the share of it still inside the sliding window;
compared in integers: p * (w - e) + (c + 1) * w <= N * w).
The error, derived: take any interval (t - d, t] with d <= w. It lies in at
most two fixed windows. In one: at most c <= N (the rule above with p >= 0).
Across the boundary B between windows i - 1 and i (t = B + e, e < d): it holds
at most p (those of window i - 1) plus the count of window i at t, which the
last admission in (B, t], at some e' <= e, left at c <= N - p * (w - e') / w
<= N - p + p * e / w. So it holds at most N + p * e / w <= N + N * d / w (as
p <= N and e < d): at most floor(N * (1 + d / w)) admissions in any interval
of length d <= w; in a whole window up to 2N (only if window i - 1's
admissions all came at its very end), but never the 2N within moments of a
boundary that a fixed window admits (N + floor(N * d / w) within d).

admit.lua
  KEYS     the window's key (sorted set in mode 'e', hash in mode 'a')
  ARGV     limit N (admissions), window w (ms), mode 'e' | 'a', owner (the
           member in mode 'e')
  result   admissions left in the window after this one (mode 'a': as estimated,
           floored)
  refusals {0, i, retry_after_ms}  the earliest a slot can free: mode 'e' when the
           admission that must leave the window for one to be free does; mode 'a'
           when the weighted count, with no further admissions, allows one
  writes on a refusal: none
  seen[g]  mode 'e': nothing; mode 'a': {p, c} as of now (window i)
complete.lua (mode 'e' only; mode 'a' gets no release entry: a count does not
know whose its admissions were, so nothing is refunded)
  KEYS     the sorted set
  ARGV     owner, 'r' | 'k': 'r' the execution was deferred before its body ran
           to an effect (PostgreSQL down, throttle(), ...): its admission is
           given back (owner's member goes); 'k' it ran: it stays counted
  result   1 given back, 0 kept (or already gone from the window)
rollback.lua (mode 'e' only; Plan.add gets no undo in mode 'a': a count does not
know whose its admissions were, so nothing is refunded, as bucket tokens are not)
  KEY      the sorted set: takes out owner's member
]]

--@ admit.check
clock()
local lim, win = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
if ARGV[ai + 2] == 'e' then
  local from = '(' .. (now_ms - win)
  local count = redis.call('ZCOUNT', KEYS[ki], from, '+inf')
  if count >= lim then
    -- count - lim + 1 admissions must leave the window for a slot: the last of them
    local entry = redis.call('ZRANGEBYSCORE', KEYS[ki], from, '+inf', 'WITHSCORES',
                             'LIMIT', count - lim, 1)
    return {0, g, math.max(1, tonumber(entry[2]) + win - now_ms)}
  end
else
  local i = math.floor(now_ms / win)
  local h = redis.call('HMGET', KEYS[ki], 'i', 'c', 'p')
  local at, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if at == i - 1 then
    c, p = 0, c
  elseif at ~= i then
    c, p = 0, 0
  end
  local e = now_ms - i * win
  if p * (win - e) + (c + 1) * win > lim * win then
    local wait
    if c + 1 <= lim and p > 0 then
      -- this window: when p's weight has fallen enough, e >= win - (lim - c - 1) * win / p
      wait = math.ceil(win - (lim - c - 1) * win / p) - e
    else
      -- the next window, with c as its p: e >= win - (lim - 1) * win / c
      wait = win - e + math.max(0, math.ceil(win - (lim - 1) * win / c))
    end
    return {0, g, math.max(1, wait)}
  end
  seen[g] = {p, c}
end

--@ admit.apply
clock()
local lim, win = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
if ARGV[ai + 2] == 'e' then
  redis.call('ZREMRANGEBYSCORE', KEYS[ki], '-inf', now_ms - win)
  redis.call('ZADD', KEYS[ki], now_ms, ARGV[ai + 3])
  redis.call('PEXPIRE', KEYS[ki], win + 1000)
  out[#out + 1] = lim - redis.call('ZCARD', KEYS[ki])
else
  local p, c = seen[g][1], seen[g][2] + 1
  redis.call('HSET', KEYS[ki], 'i', math.floor(now_ms / win), 'c', c, 'p', p)
  redis.call('PEXPIRE', KEYS[ki], 2 * win + 1000)
  local e = now_ms - math.floor(now_ms / win) * win
  out[#out + 1] = math.floor((lim * win - p * (win - e) - c * win) / win)
end

--@ complete
if ARGV[ai + 1] == 'r' then
  out[g] = redis.call('ZREM', KEYS[ki], ARGV[ai])
else
  out[g] = 0
end

--@ rollback
removed = redis.call('ZREM', key, owner)
