-- KEYS: previous window's counter, current window's counter.
-- ARGV: window length (ms), time elapsed in the current window (ms), limit, expiry of the current counter (ms),
-- requests asked for.
-- The room is RateWindow.room, in integers (every product stays below 2^53, exact in Lua's doubles).
-- Returns {requests counted (0: refused), previous count, current count before these requests}.

local previous = tonumber(redis.call('GET', KEYS[1]) or '0')
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local window = tonumber(ARGV[1])
local room = math.floor((tonumber(ARGV[3]) * window - previous * (window - tonumber(ARGV[2]))) / window) - current
local granted = math.min(room, tonumber(ARGV[5]))
if granted < 1 then
  return {0, previous, current}
end
redis.call('INCRBY', KEYS[2], granted)
redis.call('PEXPIREAT', KEYS[2], ARGV[4])
return {granted, previous, current}
