-- Put dead-lettered events back into their serials' mailboxes, in their original place in time.
--
-- ARGV[1] account key base   ARGV[2] account id   ARGV[3] active-accounts key   ARGV[4] notify key
-- ARGV[5] history retention ms   ARGV[6] history entry template suffix (JSON object text, e.g. {"by":"cli"})
-- ARGV[7] backlog high-water mark (the producer's PASSBRIDGE_BACKLOG_HIGH_WATER)   ARGV[8..] event ids
--
-- Each entry's mailbox member (arrival seq + wire JSON) and score (occurred_at ms) are restored as they
-- were, so the mailbox orders it among the serial's other events exactly as on first arrival; the state
-- machine then keeps an old replayed event from regressing newer state (it is applied as stale). The serial
-- is offered unless a worker holds it (that worker sees the entry when it reads the head again).
-- Earlier errors move into the event's retry record, with the replay time (`replayed_ms`): the retry policy
-- measures the event's age from it, so an event dead-lettered for its age gets a fresh retry window.
-- A replay never takes the account's depth over the high-water mark: ingest answers 503 beyond it, so an
-- operator's bulk replay after an outage would otherwise knock the account's live ingest over. Ids are
-- replayed in the order given (the caller passes the oldest first) while there is room; the rest stay in the
-- DLQ untouched, to be replayed once the workers have drained the backlog.
-- Returns {depth after, one flag per id}: 1 replayed, 0 not in the DLQ, 2 left in the DLQ (no room).
local base, account, active, notify = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local retention, extra, hwm = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local entries, dlq = base .. ':dlq:e', base .. ':dlq'
local now = clock_ms()
local depth = tonumber(redis.call('GET', base .. ':depth') or '0')
local out = {0}
local woke = false
for i = 8, #ARGV do
  local id = ARGV[i]
  local raw = false
  if depth < hwm then raw = redis.call('HGET', entries, id) end
  if not raw then
    -- not in the DLQ (0), or no room under the high-water mark (2: it stays in the DLQ as it is)
    out[#out + 1] = (depth >= hwm and redis.call('HEXISTS', entries, id) == 1) and 2 or 0
  else
    local entry = cjson.decode(raw)
    local serial = entry['serial']
    redis.call('ZADD', base .. ':mb:' .. serial, entry['score'], entry['member'])
    redis.call('HDEL', entries, id)
    -- A fresh attempt budget, but the earlier errors stay with the event: if it fails again, its DLQ
    -- entry shows its whole history.
    local errors = entry['errors']
    if errors == nil or #errors == 0 then errors = cjson.decode('[]') end
    redis.call('HSET', base .. ':retry', id, cjson.encode({
      serial = serial, attempts = 0, throttled = 0, first_failure_ms = 0,
      errors = errors, replays = (tonumber(entry['replays']) or 0) + 1, replayed_ms = math.floor(now)}))
    redis.call('ZREM', dlq, id)
    depth = redis.call('INCR', base .. ':depth')
    if retention > 0 then
      local key = base .. ':h:' .. serial
      redis.call('RPUSH', key, string.format('[%d,"replayed",%s,%s,%d]', math.floor(now), cjson.encode(id), extra,
        arrival_stamp(base)))
      redis.call('PEXPIRE', key, retention)
    end
    if not redis.call('ZSCORE', base .. ':leased', serial) then
      redis.call('ZADD', base .. ':ready', 'NX', now, serial)
      redis.call('ZADD', active, 'LT', now, account)
      woke = true
    end
    out[#out + 1] = 1
  end
end
if woke and redis.call('LLEN', notify) < 1000 then redis.call('RPUSH', notify, account) end
out[1] = depth
return out
