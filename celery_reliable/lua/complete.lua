--[[ complete.lua: release every guard of one finished execution in ONE round trip.

KEYS  the keys of each guard, in plan order
        L (lock): lock key
ARGV  [1] plan: one letter per guard, e.g. "L"
      then each guard's arguments, in plan order
        L: lease value ("<token> <owner>") returned by admission
Returns {r1, r2, ...}
        L: 1 released, 0 not ours any more (expired or taken over; untouched)
Safe to run twice: a second release finds nothing of ours and changes nothing.
]]
local plan = ARGV[1]
local out = {}
local ki, ai = 1, 2
for g = 1, #plan do
  local kind = string.sub(plan, g, g)
  if kind == 'L' then
    if redis.call('GET', KEYS[ki]) == ARGV[ai] then
      redis.call('DEL', KEYS[ki])
      out[g] = 1
    else
      out[g] = 0
    end
    ki, ai = ki + 1, ai + 1
  else
    return redis.error_reply('complete.lua: unknown guard ' .. kind)
  end
end
return out
