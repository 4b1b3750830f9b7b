-- Take one request slot for a (Klaviyo account, endpoint), or say how long until one frees up.
--
-- Two sliding-window logs (burst: 1 s, steady: 60 s, both already divided by the rate scale) hold the send
-- times of admitted requests. A slot is granted only when both windows have room and no 429 pause is running;
-- then the request is logged in both. A sliding window admitting N per W never exceeds N in any window of
-- length W, aligned or not, so it stays inside Klaviyo's limits whichever way Klaviyo aligns its windows.
-- Time is Redis's clock (TIME), shared by every worker process on every machine. Big numbers go through
-- string.format('%d'): Lua 5.1 would print them with 14 significant digits.
--
-- KEYS[1] burst log (zset, score = µs)   KEYS[2] steady log (zset)   KEYS[3] pause-until (string, µs)
-- ARGV[1] burst limit   ARGV[2] burst window µs   ARGV[3] steady limit   ARGV[4] steady window µs
-- ARGV[5] a unique member for this request
-- ARGV[6], ARGV[7] (optional) slots of the burst / steady window this request must leave free: work that can
-- wait (a backlog's overflow) keeps a share of the budget for work that cannot (a fresh event)
-- ARGV[8] (optional) '1': only look — return 0 if a slot is free now, but do not take it
-- KEYS[4], ARGV[9], ARGV[10] (optional) pacing, for a backlog's requests: the pace key (string, µs), the
-- interval between paced requests (µs; 0 = not paced) and how far ahead of the pace they may run (µs). This
-- is GCRA: the key holds when the next paced request is due; a request is admitted while that is at most the
-- tolerance away, and moves it on by one interval. A backlog then spends the steady budget evenly over the
-- window instead of all at its start, so it loads the machines (ours and Klaviyo's) evenly.
-- Returns 0 when the slot is taken, else the µs to wait before asking again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0

local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then
  wait = pause - now
end

for i = 1, 2 do
  local key = KEYS[i]
  local limit = tonumber(ARGV[2 * i - 1]) - tonumber(ARGV[5 + i] or '0')
  local window = tonumber(ARGV[2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', now - window))
  local count = redis.call('ZCARD', key)
  if count >= limit then
    -- The slot frees when the entry `count - limit` places from the oldest leaves the window
    -- (more than `limit` entries only exist right after the limit was lowered).
    local entry = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    local free_at = tonumber(entry[2]) + window
    if free_at - now > wait then
      wait = free_at - now
    end
  end
end

local interval = tonumber(ARGV[9] or '0')
local due = now
if interval > 0 then
  due = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), now)
  local early = due - now - tonumber(ARGV[10])
  if early > wait then
    wait = early
  end
end

if wait > 0 then
  return math.ceil(wait)
end
if ARGV[8] == '1' then
  return 0
end

if interval > 0 then
  redis.call('SET', KEYS[4], string.format('%d', due + interval), 'PX', math.ceil(tonumber(ARGV[4]) / 1000) + 1000)
end

for i = 1, 2 do
  redis.call('ZADD', KEYS[i], string.format('%d', now), ARGV[5])
  redis.call('PEXPIRE', KEYS[i], math.ceil(tonumber(ARGV[2 * i]) / 1000) + 1000)
end
return 0
