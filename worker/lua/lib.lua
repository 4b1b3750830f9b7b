-- Helpers shared by the engine's scripts; worker/scripts.py prepends this file to each of them.
--
-- Every engine script reads the clock from Redis (TIME), so leases and not-before times of all worker
-- hosts are measured on one clock. Scripts are replicated by effects (the default since Redis 5), which
-- is what makes TIME followed by writes allowed.

local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

-- An account's arrival stamp: the last arrival sequence enqueue.lua handed out (a mailbox member's prefix).
-- History entries carry it as a 5th element, so a reader can place each event's "ingested" step (derived
-- from its member's sequence, see worker/history.py) exactly among the entries written before and after.
local function arrival_stamp(base)
  return tonumber(redis.call('GET', base .. ':seq') or '0')
end

-- Stamp one stored entry (`[at,kind,id]` or `[at,kind,id,{detail}]`) with `stamp` as its 5th element;
-- entries that have one already (the engine's "ingested" entries carry their own sequence) stay as they are.
local function stamped(entry, stamp)
  local tail = string.sub(entry, -2)
  if tail == '}]' then return string.sub(entry, 1, -2) .. ',' .. stamp .. ']' end
  if tail == '"]' then return string.sub(entry, 1, -2) .. ',{},' .. stamp .. ']' end
  return entry
end

-- Append history entries ARGV[first..last] (JSON arrays starting with their ms timestamp) to `key`,
-- stamped with the account's arrival stamp (`base`), drop entries older than the retention from its head,
-- and keep the list `retention_ms` past its newest entry.
-- Up to 16 more entries are dropped than were appended: a serial that never idles long enough to expire
-- (its list's PEXPIRE is pushed back at every append) and appends many entries per settle would otherwise
-- keep ever more entries past the retention. A head within the retention stops the loop at once.
local function push_history(base, key, first, last, now, retention_ms)
  if retention_ms <= 0 or last < first then return end
  local stamp = arrival_stamp(base)
  for i = first, last do redis.call('RPUSH', key, stamped(ARGV[i], stamp)) end
  for _ = 1, 16 + last - first + 1 do
    local head = redis.call('LINDEX', key, 0)
    if not head then break end
    local ts = tonumber(string.match(head, '^%[(%d+)'))
    if ts and ts < now - retention_ms then redis.call('LPOP', key) else break end
  end
  redis.call('PEXPIRE', key, retention_ms)
end

-- Offer a serial with pending events to the claimers: `ready` at `not_before`, its account into the
-- scheduling index no later than that, and a wake-up for idle workers when it is due now.
local function offer(base, account, serial, not_before, now, active, notify)
  redis.call('ZADD', base .. ':ready', not_before, serial)
  redis.call('ZADD', active, 'LT', not_before, account)
  if not_before <= now and redis.call('LLEN', notify) < 1000 then redis.call('RPUSH', notify, account) end
end

