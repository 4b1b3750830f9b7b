-- Resume a paused account: the engine may claim its serials again, at once.
--
-- ARGV[1] account key base   ARGV[2] account id   ARGV[3] active-accounts key   ARGV[4] notify key
-- ARGV[5] how many closed pause intervals to keep
-- The pause interval is closed into the pause log ("<start_ms>:<end_ms>"), which the retry policy reads so
-- that an event's max age does not run while its account was paused. Returns the pause length in ms, or -1
-- when the account was not paused.
--
-- Any pause hash is deleted, even one without `since_ms` (claim.lua and sweep.lua treat any existing hash as
-- a pause, so one left behind would keep the account paused for good); such a pause has no interval to log.
local base, account, active, notify = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', base .. ':paused') == 0 then return -1 end
local since = redis.call('HGET', base .. ':paused', 'since_ms')
local now = math.floor(clock_ms())
redis.call('DEL', base .. ':paused')
if since then
  redis.call('RPUSH', base .. ':pauses', since .. ':' .. now)
  redis.call('LTRIM', base .. ':pauses', -tonumber(ARGV[5]), -1)
else
  since = now
end
if redis.call('ZCARD', base .. ':ready') > 0 or redis.call('ZCARD', base .. ':leased') > 0 then
  redis.call('ZADD', active, now, account)
  if redis.call('LLEN', notify) < 1000 then redis.call('RPUSH', notify, account) end
end
return now - tonumber(since)
