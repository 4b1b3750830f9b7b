-- Shared by enqueue.lua and the Apple registration scripts (included with `--!include _enqueue_core`).
--
-- enqueue_events(base, now, hwm, window, width, notify, active, account, events)
--   events: array of {event_id, serial, occurred_ms, payload}
-- Deduplicates by event_id (against the dedup buckets covering the window and earlier events of the same
-- batch) and appends the new events to their serials' mailboxes. All-or-nothing: when the new events would
-- take the account's depth over `hwm`, nothing is written.
-- Returns status (1 ok, 0 refused), depth, flags (1 enqueued / 0 duplicate per event).
--
-- Redis commands are batched per call (HMGET per bucket, one HSET, one ZMSCORE, one ZADD): a command from
-- Lua costs about a microsecond whatever its size, so per-event commands would dominate a large batch.
-- The one per-event write is the mailbox ZADD. No history entry is written here: an event's "ingested"
-- step is read from its mailbox entry while it is pending, and the engine writes it into the serial's
-- history when it settles the event (worker/history.py), which keeps ~10 µs of Redis time per event
-- (an RPUSH and a PEXPIRE, both propagated to the AOF) off the ingest path.

-- Lua's unpack() is limited by the C stack (LUAI_MAXCSTACK 8000): long argument lists go in slices.
local SLICE = 4000

local function call_sliced(cmd, key, opts, args, step)
  local results = {}
  local i = 1
  while i <= #args do
    local j = math.min(#args, i + SLICE - 1)
    j = j - ((j - i + 1) % step)  -- keep field/value pairs together
    local part = {}
    for k = 1, #opts do part[#part + 1] = opts[k] end
    for k = i, j do part[#part + 1] = args[k] end
    local r = redis.call(cmd, key, unpack(part))
    if type(r) == 'table' then for k = 1, #r do results[#results + 1] = r[k] end end
    i = j + 1
  end
  return results
end

local function enqueue_events(base, now, hwm, window, width, notify, active, account, events)
  local bucket = math.floor(now / 1000 / width)
  local oldest = bucket - math.ceil(window / width)
  local n = #events
  local flags = {}
  local ids = {}
  for i = 1, n do flags[i] = 1; ids[i] = events[i][1] end

  -- an id seen in any bucket of the window, or earlier in this batch, is a duplicate
  for b = bucket, oldest, -1 do
    local key = base .. ':dd:' .. b
    if redis.call('EXISTS', key) == 1 then
      local found = call_sliced('HMGET', key, {}, ids, 1)
      for i = 1, n do
        if found[i] then flags[i] = 0 end
      end
    end
  end
  local seen = {}
  local fresh = 0
  for i = 1, n do
    local id = ids[i]
    if seen[id] then flags[i] = 0 end
    seen[id] = true
    fresh = fresh + flags[i]
  end

  local depth = tonumber(redis.call('GET', base .. ':depth') or '0')
  if fresh > 0 and depth + fresh > hwm then
    return 0, depth, flags
  end
  if fresh == 0 then
    return 1, depth, flags
  end

  local seq = redis.call('INCRBY', base .. ':seq', fresh) - fresh
  local dd = {}
  local serials = {}
  local is_new_serial = {}
  for i = 1, n do
    if flags[i] == 1 then
      local ev = events[i]
      local serial = ev[2]
      seq = seq + 1
      redis.call('ZADD', base .. ':mb:' .. serial, tonumber(ev[3]), string.format('%012x', seq) .. ev[4])
      dd[#dd + 1] = ev[1]
      dd[#dd + 1] = serial
      if not is_new_serial[serial] then
        is_new_serial[serial] = true
        serials[#serials + 1] = serial
      end
    end
  end
  local ddkey = base .. ':dd:' .. bucket
  call_sliced('HSET', ddkey, {}, dd, 2)
  redis.call('EXPIREAT', ddkey, (bucket + 1) * width + window + 60)

  -- A leased serial is re-offered by its worker on release; a parked one keeps its not-before time (NX).
  local leased = call_sliced('ZMSCORE', base .. ':leased', {}, serials, 1)
  local offer = {}
  for i = 1, #serials do
    if not leased[i] then
      offer[#offer + 1] = now
      offer[#offer + 1] = serials[i]
    end
  end
  if #offer > 0 then call_sliced('ZADD', base .. ':ready', {'NX'}, offer, 2) end

  depth = redis.call('INCRBY', base .. ':depth', fresh)
  -- LT, not NX: an account the engine scheduled for later (only parked serials) is due now again.
  redis.call('ZADD', active, 'LT', now, account)
  if redis.call('LLEN', notify) < 1000 then redis.call('RPUSH', notify, account) end
  -- Express lanes are alive (keys.EXPRESS_ON holds their small-backlog bound): a small account's new event
  -- is announced to them, so a process that is not busy with another account's backlog claims it.
  -- Only while a worker is busy with a backlog (keys.EXPRESS_BUSY): otherwise the workers take it at once.
  local small = redis.call('GET', notify .. ':x:on')
  if small and depth <= tonumber(small) and redis.call('EXISTS', notify .. ':x:busy') == 1
      and redis.call('LLEN', notify .. ':x') < 1000 then
    redis.call('RPUSH', notify .. ':x', account)
  end
  return 1, depth, flags
end
