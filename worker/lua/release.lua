-- Give a leased serial back: done for now, parked until its next attempt, or handed over on shutdown.
--
-- ARGV[1] account key base   ARGV[2] account id   ARGV[3] serial   ARGV[4] lease token
-- ARGV[5] delay ms (the serial's not-before = now + delay)   ARGV[6] active-accounts key   ARGV[7] notify key
-- ARGV[8] history retention ms   ARGV[9] retry record field ('' = none)   ARGV[10] retry record JSON
-- ARGV[11..] history entries
--
-- Fenced: with a foreign token nothing is written and {0} is returned. Otherwise the lease ends; if the
-- mailbox still holds events (including any that arrived while the serial was leased: enqueue.lua does not
-- offer leased serials) the serial goes back to `ready` at its not-before time; an account left with nothing
-- queued or leased leaves the scheduling index. Returns {1, not_before or -1}.
local base, account, serial, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('HGET', base .. ':tok', serial) ~= token then return {0} end

local now = clock_ms()
local not_before = now + tonumber(ARGV[5])
redis.call('HDEL', base .. ':tok', serial)
redis.call('ZREM', base .. ':leased', serial)
if ARGV[9] ~= '' then redis.call('HSET', base .. ':retry', ARGV[9], ARGV[10]) end
push_history(base, base .. ':h:' .. serial, 11, #ARGV, now, tonumber(ARGV[8]))
if redis.call('EXISTS', base .. ':mb:' .. serial) == 1 then
  offer(base, account, serial, not_before, now, ARGV[6], ARGV[7])
  return {1, tostring(not_before)}
end
-- Nothing left anywhere: take the account out of the scheduling index (the next enqueue adds it back).
if redis.call('ZCARD', base .. ':ready') == 0 and redis.call('ZCARD', base .. ':leased') == 0 then
  redis.call('ZREM', ARGV[6], account)
end
return {1, '-1'}
