--[[ guards/toy.lua: T, a gate (tests/test_config_registry.py's toy guard).

The key is a hash: field 'closed' set to '1' closes the gate; 'passed' counts
the admissions it let through.

admit.lua
  KEYS     the gate's hash
  ARGV     retry_after_ms
  result   admissions through the gate so far (this one included)
  refusals {0, i, retry_after_ms}  the gate is closed
]]

--@ admit.check
if redis.call('HGET', KEYS[ki], 'closed') == '1' then
  return {0, g, tonumber(ARGV[ai])}
end

--@ admit.apply
out[#out + 1] = redis.call('HINCRBY', KEYS[ki], 'passed', 1)
