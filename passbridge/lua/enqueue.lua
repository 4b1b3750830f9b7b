-- Dedup and enqueue a batch of events for one account, atomically and all-or-nothing.
--
-- ARGV[1] key base of the account (pb:a:<id>)
-- ARGV[2] now, epoch ms
-- ARGV[3] backlog high-water mark (pending events); the batch is refused whole beyond it
-- ARGV[4] dedup window, seconds
-- ARGV[5] dedup bucket width, seconds
-- ARGV[6] notify list key, ARGV[7] active-accounts key, ARGV[8] account id
-- ARGV[9] history retention ms (0 = no history): each new event gets an "ingested" entry in its serial's
--         history list (see worker/history.py), which lives that long past its newest entry
-- ARGV[10..] groups of 4: event_id, serial, occurred_ms, payload
--
-- Returns {status, depth, flags...}: status 1 = ok (flags: 1 enqueued, 0 duplicate, one per event),
-- status 0 = refused because the backlog is over the high-water mark (nothing written).
local base = ARGV[1]
local now = tonumber(ARGV[2])
local hwm = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local width = tonumber(ARGV[5])
local notify, active, account = ARGV[6], ARGV[7], ARGV[8]
local history_ms = tonumber(ARGV[9])
local G = 10

local bucket = math.floor(now / 1000 / width)
local oldest = bucket - math.ceil(window / width)
local seen = {}
local flags = {}
local fresh = 0
local n = (#ARGV - G + 1) / 4

for i = 0, n - 1 do
  local id = ARGV[G + i * 4]
  local dup = seen[id] ~= nil
  if not dup then
    for b = bucket, oldest, -1 do
      if redis.call('HEXISTS', base .. ':dd:' .. b, id) == 1 then dup = true; break end
    end
  end
  seen[id] = true
  if dup then flags[i + 1] = 0 else flags[i + 1] = 1; fresh = fresh + 1 end
end

local depth = tonumber(redis.call('GET', base .. ':depth') or '0')
if fresh > 0 and depth + fresh > hwm then
  return {0, depth}
end

if fresh > 0 then
  local seq = redis.call('INCRBY', base .. ':seq', fresh) - fresh
  local ddkey = base .. ':dd:' .. bucket
  local leased = base .. ':leased'
  local ready = base .. ':ready'
  for i = 0, n - 1 do
    if flags[i + 1] == 1 then
      local id, serial = ARGV[G + i * 4], ARGV[G + 1 + i * 4]
      seq = seq + 1
      redis.call('ZADD', base .. ':mb:' .. serial, tonumber(ARGV[G + 2 + i * 4]),
                 string.format('%012x', seq) .. ARGV[G + 3 + i * 4])
      redis.call('HSET', ddkey, id, serial)
      if history_ms > 0 then
        local hkey = base .. ':h:' .. serial
        redis.call('RPUSH', hkey, '[' .. now .. ',"ingested",' .. cjson.encode(id) .. ']')
        redis.call('PEXPIRE', hkey, history_ms)
      end
      -- A leased serial is re-offered by its worker on release; a parked one keeps its not-before time.
      if not redis.call('ZSCORE', leased, serial) then
        redis.call('ZADD', ready, 'NX', now, serial)
      end
    end
  end
  redis.call('EXPIREAT', ddkey, (bucket + 1) * width + window + 60)
  depth = redis.call('INCRBY', base .. ':depth', fresh)
  -- LT, not NX: an account the engine scheduled for later (only parked serials) is due now again.
  redis.call('ZADD', active, 'LT', now, account)
  if redis.call('LLEN', notify) < 1000 then redis.call('RPUSH', notify, account) end
end

local out = {1, depth}
for i = 1, n do out[i + 2] = flags[i] end
return out
