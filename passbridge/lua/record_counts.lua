-- Add a recorder flush's buffered counts to Redis in one call (passbridge/metrics.py, Recorder.flush).
--
-- ARGV[1]   n: how many (key, field, increment) triples follow
-- ARGV[2..] n triples: HINCRBY key field increment
-- then      pairs (key, epoch seconds): EXPIREAT key at (once per touched hash)
--
-- One EVALSHA instead of a pipeline of HINCRBYs: a backfill touches thousands of report fields per flush
-- (every hour of every day its events occurred in), and redis-py spends tens of microseconds of Python on
-- each pipelined command, which made the flush cost more than ingesting the events themselves.
local n = tonumber(ARGV[1])
local i = 2
for _ = 1, n do
  redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
while i <= #ARGV do
  redis.call('EXPIREAT', ARGV[i], ARGV[i + 1])
  i = i + 2
end
return n
