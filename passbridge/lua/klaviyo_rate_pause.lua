-- Pause a (Klaviyo account, endpoint) after a 429: no slot is granted until now + ARGV[1] µs.
-- A pause only ever grows (two workers reporting 429s keep the later end). Returns the pause end (µs).
--
-- KEYS[1] pause-until (string, µs, Redis clock)   ARGV[1] pause length µs
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ends = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if ends > current then
  redis.call('SET', KEYS[1], string.format('%d', ends), 'PX', math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
  return ends
end
return current
