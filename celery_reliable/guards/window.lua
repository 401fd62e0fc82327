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

Turns (the refused, so they do not come back together): a refused task is told
the time the slot meant for it frees, not the time the next one does. Mode 'e':
KEYS[2] is a sorted set of the turns promised to refused tasks, member the task
id (the ticket: a deferral keeps it), score the server ms of the turn. A fresh
arrival counts the turns still ahead (and those up to min(w, 60 s) past due:
their tasks are on the way back) as taken: it is admitted only while admissions +
turns < N, and otherwise refused with the next turn: when the N-th latest of the
admissions and the turns (each a future admission) leaves the window; after a
future turn, 5% of that turn's wait later (at most 1 s: DeferPolicy's jitter,
how late its task may come back). So the k-th refused of a burst gets the k-th
slot to free, and they come back one per freed slot. A task whose turn came
takes any free slot (fewer than N admissions in the window; slots are alike),
and its turn goes; one refused then (it came back so late that another took
its slot) gets the next slot to free as its new turn; one back before its turn
(a deferral capped by the redelivery window) is admitted if a fresh arrival
would be but for its own turn (slots given back since it was refused: refunds,
rollbacks), its turn then goes, and is otherwise refused until then, turn kept. A turn whose task never comes back (purged, revoked, expired, replayed, its
worker gone for good) holds its slot until min(w, 60 s) after the turn, then
it is dropped (a "1000/d" quota is not held a day by a dead turn; a task back
later than that asks as a fresh arrival, behind the turns then promised). Turns are promises, not admissions: the bound holds
on admissions alone, as above, whatever the turns. Without a ticket a
refusal promises nothing (the next slot to free). Mode 'a': the hash's field
q is the next turn to give: refused tasks are spaced w / N apart (the rate a
full window frees slots) after the earliest the weighted count admits one;
bookkeeping only (a counter cannot tell a task back for its turn from a fresh
arrival, so nothing is held for the refused: a fresh arrival the count admits
may take a slot first, as without turns).

admit.lua
  KEYS     the window's key (sorted set in mode 'e', hash in mode 'a'), its turns
           (sorted set, mode 'e'; unused in mode 'a')
  ARGV     limit N (admissions), window w (ms), mode 'e' | 'a', owner (the
           member in mode 'e'), ticket (the task id, or '': no turn; mode 'e'),
           the deferral cap (ms, 0: none; mode 'a': a turn beyond it is not taken)
  result   admissions left in the window after this one (mode 'a': as estimated,
           floored)
  refusals {0, i, retry_after_ms}  the task's turn (above): mode 'e' when the
           admission or turn that must leave the window for its slot does; mode
           'a' the next spaced turn, no earlier than the weighted count, with no
           further admissions, allows one
  writes on a refusal: mode 'e' the task's turn (with a ticket; turns pruned w ms
           after they came); mode 'a' the next turn, q
  seen[g]  mode 'e': whether it had a turn (apply takes it out); mode 'a': {p, c}
           as of now (window i)
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
  -- a turn past due is held this long for its task (on its way back), then dropped
  local grace = math.min(win, 60000)
  local held = '(' .. (now_ms - grace)
  local ticket = ARGV[ai + 4]
  local mine = nil
  if ticket ~= '' then
    mine = tonumber(redis.call('ZSCORE', KEYS[ki + 1], ticket))
    if mine and mine <= now_ms - grace then
      mine = nil  -- its turn is long past: it asks as a fresh arrival
    end
  end
  if mine and mine > now_ms then
    -- its turn has not come (a deferral capped by the redelivery window): admitted
    -- if a fresh arrival would be but for its own turn (slots were given back since:
    -- refunds, rollbacks), its turn then goes; else same place
    local others = redis.call('ZCOUNT', KEYS[ki], from, '+inf')
                   + redis.call('ZCOUNT', KEYS[ki + 1], held, '+inf') - 1
    if others >= lim then
      return {0, g, math.max(1, mine - now_ms)}
    end
  end
  local count = redis.call('ZCOUNT', KEYS[ki], from, '+inf')
  -- a fresh arrival takes no slot promised to a refused one (its turn is still
  -- ahead, or it is on its way back); one whose turn came takes any free slot
  local ahead = 0
  if not mine then
    ahead = redis.call('ZCOUNT', KEYS[ki + 1], held, '+inf')
  end
  if count + ahead >= lim then
    local at
    if ahead == 0 then
      -- count - lim + 1 admissions must leave the window for a slot: the last of them
      local entry = redis.call('ZRANGEBYSCORE', KEYS[ki], from, '+inf', 'WITHSCORES',
                               'LIMIT', count - lim, 1)
      at = tonumber(entry[2]) + win
    else
      -- behind the promised turns: the lim-th latest of the admissions and the
      -- turns (each a future admission) leaves the window then
      local future = redis.call('ZCOUNT', KEYS[ki + 1], '(' .. now_ms, '+inf')
      if future >= lim then
        local entry = redis.call('ZREVRANGE', KEYS[ki + 1], lim - 1, lim - 1, 'WITHSCORES')
        local turn = tonumber(entry[2])
        -- that turn's task comes back up to 5% of its wait (at most 1 s) late
        -- (DeferPolicy's jitter): this one's turn is when even then it has left
        at = turn + math.min(math.ceil(0.05 * (turn - now_ms)), 1000) + win
      else
        -- the (lim - future)-th latest of the admissions and past-due turns in the window
        local m = lim - future
        local a = redis.call('ZREVRANGEBYSCORE', KEYS[ki], '+inf', from, 'WITHSCORES',
                             'LIMIT', 0, m)
        local b = redis.call('ZREVRANGEBYSCORE', KEYS[ki + 1], now_ms, held, 'WITHSCORES',
                             'LIMIT', 0, m)
        local ia, ib, score = 2, 2, nil
        for _ = 1, m do
          local sa, sb = tonumber(a[ia]), tonumber(b[ib])
          if sb == nil or (sa ~= nil and sa >= sb) then
            score, ia = sa, ia + 2
          else
            score, ib = sb, ib + 2
          end
        end
        at = score + win
      end
    end
    if ticket ~= '' then
      -- its turn: it keeps it however often it is deferred before (a capped countdown)
      redis.call('ZREMRANGEBYSCORE', KEYS[ki + 1], '-inf', now_ms - grace)
      redis.call('ZADD', KEYS[ki + 1], at, ticket)
      local keep = at - now_ms + win + 1000
      if redis.call('PTTL', KEYS[ki + 1]) < keep then
        redis.call('PEXPIRE', KEYS[ki + 1], keep)
      end
    end
    return {0, g, math.max(1, at - now_ms)}
  end
  seen[g] = mine ~= nil
else
  local i = math.floor(now_ms / win)
  local h = redis.call('HMGET', KEYS[ki], 'i', 'c', 'p', 'q')
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
    -- refused ones come back spaced win / lim apart (the rate a full window
    -- frees slots), behind those refused before (the hash's q: the next turn);
    -- one whose turn is beyond the deferral cap takes none (it comes back at the
    -- cap and asks again: a counter cannot tell it from a fresh arrival, so a
    -- turn taken at each early return would push q on and on)
    local turn = math.max(now_ms + math.max(1, wait), tonumber(h[4]) or 0)
    local cap = tonumber(ARGV[ai + 5])
    if cap <= 0 or turn - now_ms <= cap then
      redis.call('HSET', KEYS[ki], 'q', turn + math.ceil(win / lim))
      local keep = turn - now_ms + 2 * win + 1000
      if redis.call('PTTL', KEYS[ki]) < keep then
        redis.call('PEXPIRE', KEYS[ki], keep)
      end
    end
    return {0, g, turn - now_ms}
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
  if seen[g] then
    redis.call('ZREM', KEYS[ki + 1], ARGV[ai + 4])  -- its turn is used
  end
  out[#out + 1] = lim - redis.call('ZCARD', KEYS[ki])
else
  local p, c = seen[g][1], seen[g][2] + 1
  redis.call('HSET', KEYS[ki], 'i', math.floor(now_ms / win), 'c', c, 'p', p)
  if redis.call('PTTL', KEYS[ki]) < 2 * win + 1000 then
    redis.call('PEXPIRE', KEYS[ki], 2 * win + 1000)
  end
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
