-- Add a recorder flush's buffered counts to Redis in one call (passbridge/metrics.py, Recorder.flush).
--
-- ARGV[1]   n: how many (key, field, increment) triples follow ARGV[5]
-- ARGV[2]   accounts index key, ARGV[3] active-accounts key, ARGV[4] removed-accounts key
-- ARGV[5..] n triples: HINCRBY key field increment
-- then      triples (key, epoch seconds, account id), once per touched hash: EXPIREAT key at
--
-- Only for accounts that are registered, active or removed-but-not-purged: counts a process still held when
-- `passbridge accounts remove --purge` deleted the account's keys would otherwise recreate its hashes after it.
--
-- One EVALSHA instead of a pipeline of HINCRBYs: a backfill touches thousands of report fields per flush
-- (every hour of every day its events occurred in), and redis-py spends tens of microseconds of Python on
-- each pipelined command, which made the flush cost more than ingesting the events themselves.
local n = tonumber(ARGV[1])
local index, active, removed = ARGV[2], ARGV[3], ARGV[4]
local G = 5
local known, live = {}, {}
local i = G + n * 3
while i <= #ARGV do
  local account = ARGV[i + 2]
  local ok = known[account]
  if ok == nil then
    ok = redis.call('SISMEMBER', index, account) == 1
      or redis.call('ZSCORE', active, account) ~= false
      or redis.call('SISMEMBER', removed, account) == 1
    known[account] = ok
  end
  if ok then
    live[ARGV[i]] = ARGV[i + 1]
  end
  i = i + 3
end
local written = 0
for j = G, G + n * 3 - 1, 3 do
  if live[ARGV[j]] then
    redis.call('HINCRBY', ARGV[j], ARGV[j + 1], ARGV[j + 2])
    written = written + 1
  end
end
for key, at in pairs(live) do
  redis.call('EXPIREAT', key, at)
end
return written
