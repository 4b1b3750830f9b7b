-- Record every account's pending depth and DLQ size in one 10-second bucket of its activity series
-- (passbridge/metrics.py, sample).
--
-- ARGV[1] accounts index key (pb:accounts), ARGV[2] active-accounts key (pb:active)
-- ARGV[3] what every account's keys start with (pb:a:)
-- ARGV[4] the hour (the series hash's suffix), ARGV[5] the bucket, ARGV[6] the series TTL, seconds
--
-- One script, so that the accounts read and the series written cannot straddle an account's purge
-- (`passbridge accounts remove --purge` drops it from the active set, then deletes its keys): a sample that
-- read the account before the purge and wrote after it left a series hash of a purged account behind.
-- Returns how many accounts were sampled.
local ids, seen = {}, {}
local function add(list)
  for _, id in ipairs(list) do
    if not seen[id] then
      seen[id] = true
      ids[#ids + 1] = id
    end
  end
end
add(redis.call('SMEMBERS', ARGV[1]))
add(redis.call('ZRANGE', ARGV[2], 0, -1))
for _, id in ipairs(ids) do
  local base = ARGV[3] .. id
  local depth = tonumber(redis.call('GET', base .. ':depth')) or 0
  local key = base .. ':ts:' .. ARGV[4]
  redis.call('HSET', key, ARGV[5] .. ':depth', depth, ARGV[5] .. ':dlq', redis.call('ZCARD', base .. ':dlq'))
  redis.call('EXPIRE', key, ARGV[6])
end
return #ids
