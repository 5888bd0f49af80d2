-- Reset the idle time of the entries ARGV[2] lists that this consumer (ARGV[1]) still
-- owns, without counting a delivery; never take back one another consumer took over.
-- ARGV[2]: strings, each behind its length ('>I'): per stream and group, the stream, the
-- group, the first and last id, how many ids, the ids.
-- Returns the stream and id of each entry this consumer no longer owned.
local owner = ARGV[1]
local blob, pos = ARGV[2], 1
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
  local args = {stream, group, owner, 0}
  for _ = 1, n do
    local id = nxt()
    if owned[id] then
      args[#args + 1] = id
    else
      stale[#stale + 1] = stream
      stale[#stale + 1] = id
    end
    if #args == 1004 then
      args[#args + 1] = 'JUSTID'
      redis.call('XCLAIM', unpack(args))
      args = {stream, group, owner, 0}
    end
  end
  if #args > 4 then
    args[#args + 1] = 'JUSTID'
    redis.call('XCLAIM', unpack(args))
  end
end
return stale
