--[[ fenced_set.lua: write a value only if its fencing token is higher than the last accepted,
or equal to it and sent by the same holder (one acquisition writing again).

KEYS  [1] the value's hash (fields v = value, t = highest accepted token, h = its holder)
ARGV  [1] token (integer), [2] value, [3] holder (the acquisition's identity; '' = unknown)
Returns {1, token}    written
        {0, current}  refused: a higher token was already accepted, or the same token
                      by another or an unknown holder (after a failover two holders
                      may carry one token; only the first to write keeps it); nothing
                      changed
The check and the write are one atomic step on the server. Running it twice with the
same arguments writes once and accepts twice (same holder), so a resend is safe.
]]
local cur = redis.call('HMGET', KEYS[1], 't', 'h')
if cur[1] then
  local last, token = tonumber(cur[1]), tonumber(ARGV[1])
  if last > token or (last == token and (ARGV[3] == '' or cur[2] ~= ARGV[3])) then
    return {0, cur[1]}
  end
end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[1])
  redis.call('HDEL', KEYS[1], 'h')
else
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[1], 'h', ARGV[3])
end
return {1, ARGV[1]}
