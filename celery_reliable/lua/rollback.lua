--[[ rollback.lua: undo what ONE admission may have taken, when its reply was lost.

A frame, composed at load time (celery_reliable.guards.compose): each guard's
part is the "rollback" section of its fragment, celery_reliable/guards/<name>.lua.
`python -m celery_reliable.guards rollback` prints the script.

An admission that raised (a timeout, a dropped connection) may or may not have
run. This takes out exactly what that execution would own if it did, checked by
owner (unique per execution), and nothing else.

KEYS  one per entry, in ARGV[1] order (each guard's header: its KEY)
      then, optionally, the admission request's marker (the last key admit.lua
      was given)
ARGV  [1] one letter per entry, e.g. "DILK"
      then one owner per entry: the execution's owner given to admit.lua (for L,
      the holder given to admit.lua: the owner, or owner, task name and label)
      then, with a marker, its TTL in ms
Returns {r1, r2, ...}: 1 removed, 0 nothing of ours there (admission did not
        run, or it was already undone, released or taken over)
Safe to run twice, and safe when admission never ran: an entry goes only if it
carries this owner. With a marker, only the first send to arrive does anything:
the marker already there means another send of this rollback ran, and a send
arriving late (Plan.rollback resends after a timeout; the first send may reach
Redis after the second) must not take what the owner acquired since (a
FencedLock retried with the same owner): all zeros, nothing written.
Bucket tokens are not refunded (see Plan.rollback).
The marker (SET PX, written whatever was found) makes the admission request, if
it has not reached Redis yet (delayed in the network, or queued behind a stalled
server), do nothing when it does: admit.lua checks it before anything else. It
must outlive any such delay; Plan.rollback gives it the plan's longest lease, at
least ten minutes.

What a guard's section sees: key, owner (this entry's); it sets removed (0 or 1).
]]
local kinds = ARGV[1]
local out = {}
if #KEYS > #kinds then
  local marker = KEYS[#kinds + 1]
  if redis.call('EXISTS', marker) == 1 then
    for g = 1, #kinds do
      out[g] = 0
    end
    return out
  end
  redis.call('SET', marker, 1, 'PX', ARGV[#kinds + 2])
end
for g = 1, #kinds do
  local kind, key, owner = string.sub(kinds, g, g), KEYS[g], ARGV[g + 1]
  local removed = 0
  --@guards rollback 'rollback.lua: unknown guard '
  out[g] = removed
end
return out
