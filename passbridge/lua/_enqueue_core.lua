-- Shared by enqueue.lua and the Apple registration scripts (included with `--!include _enqueue_core`).
--
-- enqueue_events(base, now, hwm, window, width, notify, active, account, events)
--   events: array of {event_id, serial, occurred_ms, payload}
-- Deduplicates by event_id (against the dedup buckets covering the window and earlier events of the same
-- batch) and appends the new events to their serials' mailboxes. All-or-nothing: when the new events would
-- take the account's depth over `hwm`, nothing is written.
-- Returns status (1 ok, 0 refused), depth, flags (1 enqueued / 0 duplicate per event).
local function enqueue_events(base, now, hwm, window, width, notify, active, account, events)
  local bucket = math.floor(now / 1000 / width)
  local oldest = bucket - math.ceil(window / width)
  local seen = {}
  local flags = {}
  local fresh = 0
  local n = #events

  for i = 1, n do
    local id = events[i][1]
    local dup = seen[id] ~= nil
    if not dup then
      for b = bucket, oldest, -1 do
        if redis.call('HEXISTS', base .. ':dd:' .. b, id) == 1 then dup = true; break end
      end
    end
    seen[id] = true
    if dup then flags[i] = 0 else flags[i] = 1; fresh = fresh + 1 end
  end

  local depth = tonumber(redis.call('GET', base .. ':depth') or '0')
  if fresh > 0 and depth + fresh > hwm then
    return 0, depth, flags
  end

  if fresh > 0 then
    local seq = redis.call('INCRBY', base .. ':seq', fresh) - fresh
    local ddkey = base .. ':dd:' .. bucket
    local leased = base .. ':leased'
    local ready = base .. ':ready'
    for i = 1, n do
      if flags[i] == 1 then
        local ev = events[i]
        local serial = ev[2]
        seq = seq + 1
        redis.call('ZADD', base .. ':mb:' .. serial, tonumber(ev[3]), string.format('%012x', seq) .. ev[4])
        redis.call('HSET', ddkey, ev[1], serial)
        -- A leased serial is re-offered by its worker on release; a parked one keeps its not-before time.
        if not redis.call('ZSCORE', leased, serial) then
          redis.call('ZADD', ready, 'NX', now, serial)
        end
      end
    end
    redis.call('EXPIREAT', ddkey, (bucket + 1) * width + window + 60)
    depth = redis.call('INCRBY', base .. ':depth', fresh)
    redis.call('ZADD', active, 'NX', now, account)
    if redis.call('LLEN', notify) < 1000 then redis.call('RPUSH', notify, account) end
  end
  return 1, depth, flags
end
