--[[ fenced_set.lua: write a value only if it is newer than the last accepted: a higher fencing
token, or the same token from the same holder (one acquisition) with a higher write number.

KEYS  [1] the value's hash (fields v = value, t = highest accepted token, h = its holder,
          s = the write number of that holder's last accepted write)
ARGV  [1] token (integer), [2] value, [3] holder (the acquisition's identity; '' = unknown),
      [4] seq: the write's number, strictly increasing over one holder's writes; a resend of
          a write carries its number again (absent: that holder's writes are not ordered)
Returns {1, token, seq}          accepted: written; or this very write again (same token,
                                 holder, seq and value: a resend, or a delayed copy of its
                                 first send), which changes nothing
        {0, current, cur_seq}    refused: a higher token was already accepted, or the same
                                 token by another or an unknown holder (after a failover two
                                 holders may carry one token; only the first to write keeps
                                 it); nothing changed
        {-1, current, cur_seq}   refused: the same holder's later write (higher seq) was
                                 already accepted; this one arrived out of order (a delayed
                                 copy, or a thread that lost a race); or another write of that
                                 holder with the same seq and a different value was (two
                                 processes drew one number: the first to arrive keeps it);
                                 nothing changed
        (cur_seq: '' if the stored write has no number)
The check and the write are one atomic step on the server. A copy of a write arriving late
(the client resent it after a timeout, and the first send was only delayed) is accepted
without effect if nothing newer was written, and refused if the holder wrote since: it never
undoes a later write. The value is part of a write's identity: a different write that carries
the number of the stored one is refused, never acknowledged without being written.
]]
local cur = redis.call('HMGET', KEYS[1], 't', 'h', 's')
local token, seq = tonumber(ARGV[1]), tonumber(ARGV[4])
if cur[1] then
  local last = tonumber(cur[1])
  local done = cur[3] and tonumber(cur[3])
  if last > token or (last == token and (ARGV[3] == '' or cur[2] ~= ARGV[3])) then
    return {0, cur[1], cur[3] or ''}
  end
  if last == token and seq and done then
    if seq < done or (seq == done and redis.call('HGET', KEYS[1], 'v') ~= ARGV[2]) then
      return {-1, cur[1], cur[3]}
    elseif seq == done then
      return {1, cur[1], cur[3]}
    end
  end
end
if ARGV[3] == '' then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[1])
  redis.call('HDEL', KEYS[1], 'h', 's')
elseif seq then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[1], 'h', ARGV[3], 's', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[1], 'h', ARGV[3])
  redis.call('HDEL', KEYS[1], 's')
end
return {1, ARGV[1], ARGV[4] or ''}
