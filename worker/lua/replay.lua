-- Put dead-lettered events back into their serials' mailboxes, in their original place in time.
--
-- ARGV[1] account key base   ARGV[2] account id   ARGV[3] active-accounts key   ARGV[4] notify key
-- ARGV[5] history retention ms   ARGV[6] history entry template suffix (JSON object text, e.g. {"by":"cli"})
-- ARGV[7] replay limit: the depth up to which a replay fills the account's backlog (below the producer's
-- PASSBRIDGE_BACKLOG_HIGH_WATER by PASSBRIDGE_REPLAY_RESERVE: passbridge/settings.py replay_limit)
-- ARGV[8..] DLQ ids (an entry's event id, or the event id plus '#n' for a later entry of the same event id:
-- see settle.lua); each replays its own entry, under its event's id
--
-- Each entry's mailbox member (arrival seq + wire JSON) and score (occurred_at ms) are restored as they
-- were, so the mailbox orders it among the serial's other events exactly as on first arrival; the state
-- machine then keeps an old replayed event from regressing newer state (it is applied as stale). The serial
-- is offered unless a worker holds it (that worker sees the entry when it reads the head again).
-- Earlier errors move into the event's retry record, with the replay time (`replayed_ms`): the retry policy
-- measures the event's age from it, so an event dead-lettered for its age gets a fresh retry window; and
-- with the attempts of all its earlier runs (`attempts_before`), so its next DLQ entry can tell the attempts
-- of its last run from its total.
-- A replay never takes the account's depth over the replay limit: ingest answers 503 beyond the high-water
-- mark, and a replay that filled the backlog up to the mark would take every slot the workers free from the
-- account's live ingest while it waits for room; the reserve between the limit and the mark stays free for
-- live ingest. The check and the writes are one script, so no other replay or ingest slips in between. Ids
-- are replayed in the order given (the caller passes the oldest first) while there is room; the rest stay in
-- the DLQ untouched, to be replayed once the workers have drained the backlog.
-- Returns {depth after, one flag per id}: 1 replayed, 0 not in the DLQ, 2 left in the DLQ (no room).
local base, account, active, notify = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local retention, extra, limit = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local entries, dlq = base .. ':dlq:e', base .. ':dlq'
local now = clock_ms()
local depth = tonumber(redis.call('GET', base .. ':depth') or '0')
local out = {0}
local woke = false
for i = 8, #ARGV do
  local dlq_id = ARGV[i]
  local raw = false
  if depth < limit then raw = redis.call('HGET', entries, dlq_id) end
  if not raw then
    -- not in the DLQ (0), or no room under the replay limit (2: it stays in the DLQ as it is)
    out[#out + 1] = (depth >= limit and redis.call('HEXISTS', entries, dlq_id) == 1) and 2 or 0
  else
    local entry = cjson.decode(raw)
    local id = entry['event_id']
    local serial = entry['serial']
    redis.call('ZADD', base .. ':mb:' .. serial, entry['score'], entry['member'])
    redis.call('HDEL', entries, dlq_id)
    -- A fresh attempt budget, but the earlier errors stay with the event: if it fails again, its DLQ
    -- entry shows its whole history.
    local errors = entry['errors']
    if errors == nil or #errors == 0 then errors = cjson.decode('[]') end
    -- Entries written before the total was kept: their errors are every counted attempt (up to 50).
    local before = tonumber(entry['attempts_total']) or #errors
    redis.call('HSET', base .. ':retry', id, cjson.encode({
      serial = serial, attempts = 0, throttled = 0, first_failure_ms = 0, attempts_before = before,
      errors = errors, replays = (tonumber(entry['replays']) or 0) + 1, replayed_ms = math.floor(now)}))
    redis.call('ZREM', dlq, dlq_id)
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
