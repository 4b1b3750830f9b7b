-- Apple PassKit: register a device for a pass, and fire `installed` when the pass's device count goes 0 → 1.
-- One atomic step: the registration and the event's enqueue happen together or not at all.
--
-- KEYS[1] the pass's registrations hash (device → push token)
-- KEYS[2] the pass's install generation counter
-- KEYS[3] the device's pass-type index (zset serial → registration ms)
-- ARGV[1] device id, ARGV[2] push token, ARGV[3] serial, ARGV[4] now (epoch ms)
-- ARGV[5..11] enqueue parameters: key base, high-water mark, dedup window s, bucket width s,
--             notify key, active-accounts key, account id
-- ARGV[12] event id prefix (the generation is appended)
-- ARGV[13], ARGV[14] the event's wire JSON before and after the generation (empty = fire no event,
--             the pass type is not synced)
-- ARGV[15] how many devices a pass may have registered (anyone holding the pass file has its token and
--             could register device ids without end otherwise)
--
-- Returns {code, event_id, crossed}: code 201 new registration, 200 already registered (push token
-- refreshed), 409 refused because the pass has the most devices it may have, 503 refused because the
-- account's backlog is over its high-water mark (nothing written); crossed 1 when the pass's device count
-- went 0 → 1, the event fired or not (an unsynced pass type's `installed` is counted as skipped then).
--!include _enqueue_core

local regs, genkey, devkey = KEYS[1], KEYS[2], KEYS[3]
local device, token, serial, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])

if redis.call('HEXISTS', regs, device) == 1 then
  redis.call('HSET', regs, device, token)
  return {200, '', 0}
end

local devices = redis.call('HLEN', regs)
if devices >= tonumber(ARGV[15]) then return {409, '', 0} end
local event_id = ''
if devices == 0 then
  local gen = tonumber(redis.call('GET', genkey) or '0') + 1
  if ARGV[13] ~= '' then
    event_id = ARGV[12] .. gen
    local status = enqueue_events(ARGV[5], now, tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
      ARGV[9], ARGV[10], ARGV[11], {{event_id, serial, now, ARGV[13] .. gen .. ARGV[14]}})
    if status == 0 then return {503, '', 0} end
  end
  redis.call('SET', genkey, gen)
end
redis.call('HSET', regs, device, token)
redis.call('ZADD', devkey, now, serial)
return {201, event_id, devices == 0 and 1 or 0}
