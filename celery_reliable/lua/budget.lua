--[[ budget.lua: a task's ratio retry budget (Finagle's RetryBudget), deposits and a withdrawal
in ONE round trip.

Tokens live in a window of `ttl`, cut into 10 slices (Finagle's WindowedAdder): the hash
holds one field per slice, the slice's index (floor(now_ms / slice_ms)), with the net tokens
put in during it. A field older than the window is deleted, so a token expires between
0.9 ttl and ttl after it was put in. The balance is the window's sum plus a constant
reserve; a withdrawal puts a negative amount in the current slice, which expires the same
way, so the reserve comes back ttl later (that is the minimum retry rate).

KEYS  [1] the budget hash
ARGV  [1] deposits: first executions to credit now (>= 0)
      [2] 1: take one retry if the balance allows; 0: deposit only
      [3] tokens per deposit (1000; 0 when the ratio is 0)
      [4] tokens per retry (floor(1000 / ratio); 1 when the ratio is 0)
      [5] reserve, tokens (min_per_second * ttl * tokens per retry)
      [6] ttl_ms
      [7] now_ms: empty in production (the server's TIME); a number only in tests and
          benchmarks, which drive the clock (retrybudget.WindowedBudget is the same
          algorithm in Python, and a test holds the two equal)
Returns {granted (1 a retry was taken, else 0), balance (whole retries left now)}
Never refuses a deposit. Integer arithmetic only (exact in Lua's doubles).
]]
local key = KEYS[1]
local deposits, withdraw = tonumber(ARGV[1]), tonumber(ARGV[2])
local put, cost, reserve = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl_ms = tonumber(ARGV[6])
local now_ms = tonumber(ARGV[7])
if not now_ms then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local slice = math.max(1, math.floor(ttl_ms / 10))
local current = math.floor(now_ms / slice)
local field = string.format('%d', current)  -- never a float's exponent form

local sum = 0
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  if tonumber(fields[i]) <= current - 10 then
    redis.call('HDEL', key, fields[i])  -- out of the window
  else
    sum = sum + tonumber(fields[i + 1])
  end
end

local wrote = false
if deposits > 0 and put > 0 then
  redis.call('HINCRBY', key, field, string.format('%d', deposits * put))
  sum = sum + deposits * put
  wrote = true
end
local granted = 0
if withdraw == 1 and sum + reserve >= cost then
  redis.call('HINCRBY', key, field, string.format('%d', -cost))
  sum = sum - cost
  granted = 1
  wrote = true
end
if wrote then
  redis.call('PEXPIRE', key, ttl_ms + slice)  -- every field is out of the window by then
end
return {granted, math.floor((sum + reserve) / cost)}
