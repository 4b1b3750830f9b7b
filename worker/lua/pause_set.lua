-- Set fields of an account's pause only while the pause exists.
--
-- ARGV[1] account key base   ARGV[2..] field, value, field, value, ...
-- A write that comes late, after a resume deleted the pause (a pause's registry sync, a sweep's probe time),
-- must not recreate the hash: a pause without `since_ms` would keep the account paused and no resume would
-- close it. Returns 1 if the fields were set, 0 if the account is not paused.
local key = ARGV[1] .. ':paused'
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, unpack(ARGV, 2))
return 1
