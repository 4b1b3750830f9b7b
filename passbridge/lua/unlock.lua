-- Release a lock only if we still hold it (the value is the holder's random token).
-- KEYS[1] lock key; ARGV[1] the holder's token. Returns 1 when released, 0 when someone else holds it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
