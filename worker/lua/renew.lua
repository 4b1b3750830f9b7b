-- Extend the leases a worker still holds.
--
-- ARGV[1] account key base (pb:a:<id>)   ARGV[2] lease ms   ARGV[3..] pairs: serial, token
-- A lease is extended only while its token is still the serial's (fencing): a lease that was taken over
-- stays lost. Returns one flag per pair: 1 renewed, 0 lost.
-- One HMGET and one ZADD for all pairs: a script runs alone in Redis, so its cost is every other client's wait.
local base, lease_ms = ARGV[1], tonumber(ARGV[2])
local tokens, leased = base .. ':tok', base .. ':leased'
local expiry = clock_ms() + lease_ms
local serials = {}
for i = 3, #ARGV, 2 do
  serials[#serials + 1] = ARGV[i]
end
if #serials == 0 then
  return {}
end
local current = redis.call('HMGET', tokens, unpack(serials))
local out, zargs = {}, {}
for k = 1, #serials do
  if current[k] == ARGV[2 * k + 2] then
    zargs[#zargs + 1] = expiry
    zargs[#zargs + 1] = serials[k]
    out[k] = 1
  else
    out[k] = 0
  end
end
if #zargs > 0 then
  redis.call('ZADD', leased, 'XX', unpack(zargs))
end
return out
