-- Dead letters (ARGV: their hashes) go back to their listener's stream with fresh
-- attempts. KEYS[1]: the dead letters' sorted set.
local n = 0
for _, key in ipairs(ARGV) do
  local h = redis.call('HGETALL', key)
  if #h > 0 then
    local target
    local fields = {}
    for i = 1, #h, 2 do
      local f = h[i]
      if f == '_k' then
        target = h[i + 1]
      elseif f == 'e' then
        fields[#fields + 1] = f
        fields[#fields + 1] = h[i + 1]
      end
    end
    redis.call('XADD', target, '*', unpack(fields))
    n = n + 1
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], key)
end
return n
