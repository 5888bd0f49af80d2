-- Trim each stream of KEYS below the oldest entry a group still needs: its oldest
-- pending entry, or the one after the last it read. A stream no group reads is emptied.
-- ARGV[1] > 0: also forget consumers idle that many ms with nothing pending.
local function parse(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local reap = tonumber(ARGV[1])
local total = 0
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local minid = nil
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
      local name, pending, last
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1]
        elseif g[i] == 'pending' then pending = g[i + 1]
        elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
      end
      local pos
      if pending > 0 then
        pos = redis.call('XPENDING', key, name)[2]
      else
        local ms, seq = string.match(last, '(%d+)-(%d+)')
        pos = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
      end
      if minid == nil or less(pos, minid) then minid = pos end
      if reap > 0 then
        for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, name)) do
          local cname, cpending, cidle
          for i = 1, #c, 2 do
            if c[i] == 'name' then cname = c[i + 1]
            elseif c[i] == 'pending' then cpending = c[i + 1]
            elseif c[i] == 'idle' then cidle = c[i + 1] end
          end
          if cpending == 0 and cidle > reap then
            redis.call('XGROUP', 'DELCONSUMER', key, name, cname)
          end
        end
      end
    end
    if minid == nil then
      total = total + redis.call('XTRIM', key, 'MAXLEN', 0)
    else
      total = total + redis.call('XTRIM', key, 'MINID', minid)
    end
  end
end
return total
