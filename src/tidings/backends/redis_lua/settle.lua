-- Write delivery outcomes back, each only if this consumer (ARGV[1]) still owns the
-- entry: a worker whose lease expired never settles what another one took over.
-- KEYS[1]: the dead letters' sorted set. KEYS[2], KEYS[3]: the hashes of each
-- listener's (group's) attempts that returned and that failed, counted here as written.
-- ARGV[2]: now (epoch seconds). ARGV[4]: a time before which a retry may come due
-- before its reader looks again.
-- ARGV[3]: strings, each behind its length ('>I'): per stream and group, the stream,
-- the group, the first and last id, how many outcomes, then each: its kind and id, and
-- 0 ack: nothing more;
-- 1 retry: item key, own stream, entry, attempts, due time, retry set;
-- 2 burial: dead letter key, own stream, entry, error, traceback, attempts;
-- 3 release (idle at once, the attempt not counted): the retry count;
-- 4 uncount (the claim's attempt taken back, nothing else): the retry count.
-- Returns the stream and id of each outcome this consumer no longer owned (left alone;
-- an uncount of an entry settled meanwhile is not one).
local owner, now = ARGV[1], ARGV[2]
local blob, pos = ARGV[3], 1
local function nxt()
  local v
  v, pos = struct.unpack('>Ic0', blob, pos)
  return v
end
local stale = {}
while pos <= #blob do
  local stream, group, low, high, n = nxt(), nxt(), nxt(), nxt(), tonumber(nxt())
  local owned = {}
  for _, p in ipairs(redis.call('XPENDING', stream, group, low, high, n + 1000000, owner)) do
    owned[p[1]] = true
  end
  local acks = {}
  local failed = 0
  for _ = 1, n do
    local kind, id = nxt(), nxt()
    local f = {}
    local extra = (kind == '0' and 0) or ((kind == '3' or kind == '4') and 1) or 6
    for j = 1, extra do f[j] = nxt() end
    if kind == '4' then
      if owned[id] then
        redis.call('XCLAIM', stream, group, owner, 0, id, 'RETRYCOUNT', f[1], 'JUSTID')
      end
    elseif not owned[id] then
      stale[#stale + 1] = stream
      stale[#stale + 1] = id
    elseif kind == '0' then
      acks[#acks + 1] = id
    elseif kind == '1' then
      local first = redis.call('ZRANGE', f[6], 0, 0, 'WITHSCORES')[2]
      redis.call('HSET', f[1], '_k', f[2], 'e', f[3], 'a', f[4])
      redis.call('ZADD', f[6], f[5], f[1])
      if (first == nil or tonumber(f[5]) < tonumber(first)) and tonumber(f[5]) < tonumber(ARGV[4]) then
        redis.call('XADD', f[2], '*', 'w', '1')  -- due soon, before what its reader waits for
      end
      acks[#acks + 1] = id
      failed = failed + 1
    elseif kind == '2' then
      redis.call('HSET', f[1], '_k', f[2], 'e', f[3], 'error', f[4], 'tb', f[5],
        'at', now, 'attempts', f[6])
      redis.call('ZADD', KEYS[1], now, f[1])
      acks[#acks + 1] = id
      failed = failed + 1
    else
      redis.call('XCLAIM', stream, group, owner, 0, id, 'IDLE', 315360000000,
        'RETRYCOUNT', f[1], 'JUSTID')
    end
  end
  for i = 1, #acks, 1000 do
    redis.call('XACK', stream, group, unpack(acks, i, math.min(i + 999, #acks)))
  end
  if #acks > failed then redis.call('HINCRBY', KEYS[2], group, #acks - failed) end
  if failed > 0 then redis.call('HINCRBY', KEYS[3], group, failed) end
end
return stale
