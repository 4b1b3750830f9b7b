-- Housekeeping for one account (the cron sweep; claims do the same for the accounts they visit).
--
-- ARGV[1] account key base   ARGV[2] account id   ARGV[3] active-accounts key   ARGV[4] notify key
-- Takes over expired leases (serial back to `ready`, token deleted) and makes sure an account with queued
-- work is in `active` no later than its next due time, unless it is paused. Returns {taken_over, in_active}.
local base, account, active, notify = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ready, leased, tokens = base .. ':ready', base .. ':leased', base .. ':tok'
local now = clock_ms()
local taken = 0
for _, serial in ipairs(redis.call('ZRANGEBYSCORE', leased, '-inf', now)) do
  redis.call('ZREM', leased, serial)
  redis.call('HDEL', tokens, serial)
  if redis.call('EXISTS', base .. ':mb:' .. serial) == 1 then offer(base, account, serial, now, now, active, notify) end
  taken = taken + 1
end
if redis.call('EXISTS', base .. ':paused') == 1 then return {taken, 0} end
local r = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
local l = redis.call('ZRANGE', leased, 0, 0, 'WITHSCORES')
if #r == 0 and #l == 0 then return {taken, 0} end
local next_due = nil
if #r > 0 then next_due = tonumber(r[2]) end
if #l > 0 and (next_due == nil or tonumber(l[2]) < next_due) then next_due = tonumber(l[2]) end
redis.call('ZADD', active, 'LT', next_due, account)
return {taken, 1}
