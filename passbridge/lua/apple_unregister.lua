-- Apple PassKit: unregister a device from a pass, and fire `uninstalled` when the pass's device count goes
-- 1 → 0. One atomic step, like apple_register.lua (same KEYS and ARGV[3..14]; ARGV[2] is unused).
--
-- The event id carries the pass's current install generation, so the uninstall of a later reinstall has a
-- different id.
-- Returns {code, event_id, crossed}: 200 unregistered, 204 the device was not registered (nothing changed),
-- 503 refused because the account's backlog is over its high-water mark (nothing written); crossed 1 when
-- the pass's device count went 1 → 0, the event fired or not.
--!include _enqueue_core

local regs, genkey, devkey = KEYS[1], KEYS[2], KEYS[3]
local device, serial, now = ARGV[1], ARGV[3], tonumber(ARGV[4])

if redis.call('HEXISTS', regs, device) == 0 then
  return {204, '', 0}
end

local event_id = ''
local last = redis.call('HLEN', regs) == 1
if last and ARGV[13] ~= '' then
  local gen = redis.call('GET', genkey) or '0'
  event_id = ARGV[12] .. gen
  local status = enqueue_events(ARGV[5], now, tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
    ARGV[9], ARGV[10], ARGV[11], {{event_id, serial, now, ARGV[13] .. gen .. ARGV[14]}})
  if status == 0 then return {503, '', 0} end
end
redis.call('HDEL', regs, device)
redis.call('ZREM', devkey, serial)
return {200, event_id, last and 1 or 0}
