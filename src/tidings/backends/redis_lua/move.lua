-- Move the due items (retries, delayed events) of sorted set KEYS[1] into their
-- streams; return how many, and the due time of the next one left ('' if none).
-- ARGV[1]: now (epoch seconds), ARGV[2]: the most to move.
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, item in ipairs(items) do
  local h = redis.call('HGETALL', item)
  local target
  local fields = {}
  for i = 1, #h, 2 do
    if h[i] == '_k' then
      target = h[i + 1]
    else
      fields[#fields + 1] = h[i]
      fields[#fields + 1] = h[i + 1]
    end
  end
  if target then
    redis.call('XADD', target, '*', unpack(fields))
  end
  redis.call('DEL', item)
  redis.call('ZREM', KEYS[1], item)
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#items, nxt[2] or ''}
