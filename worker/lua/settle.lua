-- Settle events of a leased serial: remove them from its mailbox (written to Klaviyo, or dead-lettered),
-- store the serial's applied state, drop their retry records, record history and DLQ entries — one atomic,
-- fenced step. The lease stays held: the worker goes on with the serial's next event.
--
-- ARGV[1] account key base     ARGV[2] serial        ARGV[3] lease token     ARGV[4] state JSON ('' = keep)
-- ARGV[5] history retention ms ARGV[6] how many head entries to return
-- ARGV[7] m members to remove  ARGV[8] r retry fields to delete  ARGV[9] h history entries
-- ARGV[10] d DLQ entries, then the m members, r event ids, h history entries and d pairs (event id, JSON)
--
-- A DLQ entry's id is its event id, or — when an entry of that event id is in the DLQ already (a client may
-- send an event id again once the dedup window has forgotten it) — the event id plus '#2', '#3', ...: the
-- smallest one free. Chosen here, atomically, so no entry ever replaces another (worker/dlq.py).
--
-- Returns {1, removed, head members...} (the mailbox's next entries after the removal, in order), or {0}
-- when the token is no longer the serial's: the lease was lost and nothing was written.
local base, serial, token = ARGV[1], ARGV[2], ARGV[3]
if redis.call('HGET', base .. ':tok', serial) ~= token then return {0} end

local state, retention, nhead = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local m, r, h, d = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local now = clock_ms()
local mailbox = base .. ':mb:' .. serial
local i = 11

local removed = 0
for j = i, i + m - 1 do removed = removed + redis.call('ZREM', mailbox, ARGV[j]) end
i = i + m
if removed > 0 then redis.call('DECRBY', base .. ':depth', removed) end
for j = i, i + r - 1 do redis.call('HDEL', base .. ':retry', ARGV[j]) end
i = i + r
push_history(base, base .. ':h:' .. serial, i, i + h - 1, now, retention)
i = i + h
for j = i, i + 2 * d - 1, 2 do
  local id = ARGV[j]
  if redis.call('HEXISTS', base .. ':dlq:e', id) == 1 then
    local n = 2
    while redis.call('HEXISTS', base .. ':dlq:e', ARGV[j] .. '#' .. n) == 1 do n = n + 1 end
    id = ARGV[j] .. '#' .. n
  end
  redis.call('ZADD', base .. ':dlq', now, id)
  redis.call('HSET', base .. ':dlq:e', id, ARGV[j + 1])
end
if state ~= '' then redis.call('HSET', base .. ':state', serial, state) end

local out = {1, removed}
if nhead > 0 then
  for _, member in ipairs(redis.call('ZRANGE', mailbox, 0, nhead - 1)) do out[#out + 1] = member end
end
return out
