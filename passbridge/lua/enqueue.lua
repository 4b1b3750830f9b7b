-- Dedup and enqueue a batch of events for one account, atomically and all-or-nothing.
--
-- ARGV[1] key base of the account (pb:a:<id>)
-- ARGV[2] now, epoch ms
-- ARGV[3] backlog high-water mark (pending events); the batch is refused whole beyond it
-- ARGV[4] dedup window, seconds
-- ARGV[5] dedup bucket width, seconds
-- ARGV[6] notify list key, ARGV[7] active-accounts key, ARGV[8] account id
-- ARGV[9..] groups of 4: event_id, serial, occurred_ms, payload
--
-- Returns {status, depth, flags...}: status 1 = ok (flags: 1 enqueued, 0 duplicate, one per event),
-- status 0 = refused because the backlog is over the high-water mark (nothing written).
--!include _enqueue_core

local G = 9
local events = {}
for i = 0, (#ARGV - G + 1) / 4 - 1 do
  events[i + 1] = {ARGV[G + i * 4], ARGV[G + 1 + i * 4], ARGV[G + 2 + i * 4], ARGV[G + 3 + i * 4]}
end

local status, depth, flags = enqueue_events(
  ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  ARGV[6], ARGV[7], ARGV[8], events)
if status == 0 then return {0, depth} end

local out = {1, depth}
for i = 1, #events do out[i + 2] = flags[i] end
return out
