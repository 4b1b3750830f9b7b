-- Extend the leases a worker still holds.
--
-- ARGV[1] account key base (pb:a:<id>)   ARGV[2] lease ms   ARGV[3..] pairs: serial, token
-- A lease is extended only while its token is still the serial's (fencing): a lease that was taken over
-- stays lost. Returns one flag per pair: 1 renewed, 0 lost.
local base, lease_ms = ARGV[1], tonumber(ARGV[2])
local tokens, leased = base .. ':tok', base .. ':leased'
local expiry = clock_ms() + lease_ms
local out = {}
for i = 3, #ARGV, 2 do
  if redis.call('HGET', tokens, ARGV[i]) == ARGV[i + 1] then
    redis.call('ZADD', leased, 'XX', expiry, ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
