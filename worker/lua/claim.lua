-- Claim up to N due serials across accounts, fairly, each under a fresh lease token.
--
-- ARGV[1] account key prefix (pb:a:)      ARGV[2] active-accounts zset     ARGV[3] lease counter key
-- ARGV[4] worker id                       ARGV[5] lease ms                  ARGV[6] max serials in total
-- ARGV[7] max serials per account         ARGV[8] max accounts to visit     ARGV[9] max expired leases taken
--                                                                                   over per account
-- ARGV[10] reserve R (0 = none)           ARGV[11] the worker's free slots F
-- ARGV[12] fresh window ms (0 = off)      ARGV[13] most fresh serials per account per claim
-- ARGV[14] lane: 'express', 'main' (busy: defers small accounts to express lanes) or 'free' (does not)
-- ARGV[15] express-on key (keys.EXPRESS_ON)
-- ARGV[16] express grace ms               ARGV[17] H, snapshot heads (0 = no snapshot, see the end)
-- ARGV[18] K, the number of accounts named next (0 = walk `active`; an express lane that names accounts
--   also takes the announcements still queued for it, see below)
-- ARGV[19..18+K] accounts to visit        ARGV[19+K..] pairs (account, serials this worker already holds of it)
-- Accounts are visited in the order of their score in `active` (the least recently served due account
-- first): round-robin. Each visited account first has its expired leases taken over (the serial goes back
-- to `ready`, the token is deleted so the old holder can no longer commit), then gives at most an equal
-- share of what is left of N. Its score then becomes its next due time: "now" if it still has due serials
-- (the back of the rotation), else its earliest not-before or lease expiry; an account with neither
-- leaves `active` (the next enqueue puts it back). A paused account leaves `active` until it is resumed.
-- A deferred account (`:defer` exists: its Klaviyo budget is spent) is rescheduled for when the key expires.
--
-- Fair share inside one worker: the last R of its F free slots are a reserve no single account may fill
-- beyond R serials of its own. An account may take max(R - held, free left - R) serials: up to R for
-- itself out of the reserve, more only while more than R slots stay free. So one account's backlog never
-- takes every slot of every worker, and another account's fresh event finds a free slot at once instead
-- of waiting for the backlog's serials to finish. A due account that got nothing because of this keeps its
-- place and is reported, so the worker re-checks soon instead of sleeping.
--
-- Fresh first (bulk modes): within an account, up to ARGV[13] of the serials taken are the newest due ones
-- made ready in the last ARGV[12] ms (a new event, not the backlog), the rest the oldest. A backlog is
-- drained oldest first while an event that just arrived does not queue behind all of it. While an account
-- has few fresh serials (at most 4 x ARGV[13]: a trickle, not a big batch just enqueued) they may also use
-- the reserve, so a worker full of the account's backlog still picks up its new events at once.
--
-- Express lane (worker/express.py): while express lanes are alive, the express-on key holds the backlog
-- (pending events) up to which an account is small. An express lane takes serials of small accounts only
-- (the accounts it was told about, or those due within the grace period); busy other lanes leave a small
-- account's serials alone until they have been due for the grace period, so the express lanes -- processes
-- busy with no big backlog -- work them, and a dead express lane costs a small account at most the grace.
--
-- Snapshot (H > 0, the express lanes' claims of a few serials): each lease also carries what the engine reads
-- right after a claim (worker.queue.WorkQueue.snapshot): the serial's first H mailbox entries, its stored
-- state and whether a profile import job may still carry it, so a small account's event costs one round
-- trip less on its way to Klaviyo. A backlog's claims of hundreds of serials leave it to a pipeline after the
-- claim, so this script stays short for every other client of Redis.
--
-- Returns {taken_over, capped, account1, serial1, token1, account2, ...}; with a snapshot each lease is
-- followed by {heads...}, its state (false if none) and 1/0 for the profile-job mark.
local prefix, active, seqkey, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease_ms, max_n = tonumber(ARGV[5]), tonumber(ARGV[6])
local per_account, scan, max_takeover = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local reserve, free = tonumber(ARGV[10] or '0'), tonumber(ARGV[11] or ARGV[6])
local held = {}
local fresh_ms, fresh_take = tonumber(ARGV[12] or '0'), tonumber(ARGV[13] or '0')
local express = ARGV[14] == 'express'
local small_bound = tonumber(redis.call('GET', ARGV[15]) or '-1')
local grace = tonumber(ARGV[16])
local snapshot_heads = tonumber(ARGV[17])
local named = tonumber(ARGV[18])
for i = 19 + named, #ARGV - 1, 2 do held[ARGV[i]] = tonumber(ARGV[i + 1]) end

local now = clock_ms()
-- keys.EXPRESS_NOTIFY: the express-on key's name without ':on'.
local express_notify = string.sub(ARGV[15], 1, -4)
-- An express lane names the account whose announcement woke it (its BLPOP of keys.EXPRESS_NOTIFY); the ones
-- queued behind it are taken here, in the same step, not in a round trip of their own before it.
local queued = {}
if express and named > 0 then
  queued = redis.call('LPOP', express_notify, 31) or {}
end
-- An express lane works only while some worker is busy with a backlog (keys.EXPRESS_BUSY); otherwise the
-- workers take every account's events themselves.
local busy = redis.call('EXISTS', express_notify .. ':busy') == 1
if express and not busy then return {0, 0} end
if not busy then small_bound = -1 end
local accounts
if named > 0 then
  accounts = {}
  local listed = {}
  for i = 19, 18 + named do
    if not listed[ARGV[i]] then accounts[#accounts + 1] = ARGV[i]; listed[ARGV[i]] = true end
  end
  for _, account in ipairs(queued) do
    if not listed[account] then accounts[#accounts + 1] = account; listed[account] = true end
  end
elseif express then
  accounts = redis.call('ZRANGEBYSCORE', active, '-inf', now + grace, 'LIMIT', 0, scan)
else
  accounts = redis.call('ZRANGEBYSCORE', active, '-inf', now, 'LIMIT', 0, scan)
end
local out = {0, 0}
local got = 0
local left = #accounts

for _, account in ipairs(accounts) do
  -- Accounts not reached keep their place in the rotation.
  if got >= max_n then break end
  local base = prefix .. account
  local ready, leased, tokens = base .. ':ready', base .. ':leased', base .. ':tok'
  local deferred = redis.call('PTTL', base .. ':defer')
  local small = small_bound >= 0 and tonumber(redis.call('GET', base .. ':depth') or '0') <= small_bound
  -- What this lane may take of the account: all that is due, or (small account, another lane) only what
  -- has been due for the grace period.
  local horizon = now
  if small and ARGV[14] == 'main' then horizon = now - grace end
  if express and not small then
    -- Not the express lane's: the account keeps its place for the other lanes.
  elseif redis.call('EXISTS', base .. ':paused') == 1 then
    redis.call('ZREM', active, account)
  elseif deferred > 0 then
    -- Out of Klaviyo budget: not due again before the budget returns (an enqueue may have made it due).
    redis.call('ZADD', active, now + deferred, account)
  else
    local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now, 'LIMIT', 0, max_takeover)
    for _, serial in ipairs(expired) do
      redis.call('ZREM', leased, serial)
      redis.call('HDEL', tokens, serial)
      if redis.call('EXISTS', base .. ':mb:' .. serial) == 1 then
        redis.call('ZADD', ready, now, serial)
      end
      out[1] = out[1] + 1
    end
    local take = math.min(per_account, math.ceil((max_n - got) / left))
    local share = take
    if reserve > 0 then
      local allowance = math.max(reserve - (held[account] or 0), free - got - reserve)
      if allowance < take then
        take = math.max(0, allowance)
        out[2] = 1
      end
    end
    local function lease(serials)
      for _, serial in ipairs(serials) do
        local token = worker .. '.' .. redis.call('INCR', seqkey)
        redis.call('ZREM', ready, serial)
        redis.call('ZADD', leased, now + lease_ms, serial)
        redis.call('HSET', tokens, serial, token)
        out[#out + 1] = account
        out[#out + 1] = serial
        out[#out + 1] = token
        if snapshot_heads > 0 then
          out[#out + 1] = redis.call('ZRANGE', base .. ':mb:' .. serial, 0, snapshot_heads - 1)
          out[#out + 1] = redis.call('HGET', base .. ':state', serial)
          out[#out + 1] = redis.call('HEXISTS', base .. ':pjobs', serial)
        end
        got = got + 1
      end
      return #serials
    end
    if fresh_ms > 0 and fresh_take > 0 and horizon == now then
      local limit = take
      -- A trickle of fresh serials (a few new events while the account's backlog drains) may use the
      -- reserve; a flood (a big batch just enqueued) is a backlog like any other and must not fill it.
      if share > take and redis.call('ZCOUNT', ready, now - fresh_ms, now) <= 4 * fresh_take then
        limit = share
      end
      if limit > 0 then
        take = math.max(0, take - lease(redis.call('ZREVRANGEBYSCORE', ready, now, now - fresh_ms, 'LIMIT', 0,
          math.min(limit, fresh_take))))
      end
    end
    if take > 0 then lease(redis.call('ZRANGEBYSCORE', ready, '-inf', horizon, 'LIMIT', 0, take)) end
    local r = redis.call('ZRANGE', ready, 0, 0, 'WITHSCORES')
    local l = redis.call('ZRANGE', leased, 0, 0, 'WITHSCORES')
    if #r == 0 and #l == 0 then
      redis.call('ZREM', active, account)
    else
      local next_due = nil
      if #r > 0 then next_due = tonumber(r[2]) + (now - horizon) end
      if #l > 0 and (next_due == nil or tonumber(l[2]) < next_due) then next_due = tonumber(l[2]) end
      if next_due < now then next_due = now end
      redis.call('ZADD', active, next_due, account)
    end
  end
  left = left - 1
end
return out
