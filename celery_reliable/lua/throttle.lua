--[[ throttle.lua: empty token buckets fleet-wide for a while (e.g. on HTTP 429 Retry-After).

KEYS  bucket hashes
ARGV  [1] pause_ms, then per key: burst (tokens), rate (tokens/s) (for the idle expiry)
Every bucket gets 0 tokens and refills only from now + pause_ms.
Returns the number of buckets throttled.
]]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now_ms + tonumber(ARGV[1])
for i = 1, #KEYS do
  local ts = tonumber(redis.call('HGET', KEYS[i], 'ts') or '0')
  redis.call('HSET', KEYS[i], 't', '0', 'ts', math.max(ts, until_ms))
  local burst, rate = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  -- never shorten the expiry: the bucket's queue of deferred tasks (q) may reach further
  local ttl = tonumber(ARGV[1]) + math.ceil(burst * 1000 / rate) + 1000
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return #KEYS
