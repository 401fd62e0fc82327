--[[ fenced_set.lua: write a value only if its fencing token is not lower than the last accepted.

KEYS  [1] the value's hash (fields v = value, t = highest accepted token)
ARGV  [1] token (integer), [2] value
Returns {1, token}    written
        {0, current}  refused: a higher token was already accepted; nothing changed
The check and the write are one atomic step on the server.
]]
local cur = redis.call('HGET', KEYS[1], 't')
if cur and tonumber(cur) > tonumber(ARGV[1]) then
  return {0, cur}
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[1])
return {1, ARGV[1]}
