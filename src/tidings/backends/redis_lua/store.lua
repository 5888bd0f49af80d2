-- Store a batch of events. KEYS[1]: the marker that this store has its data,
-- KEYS[2]: the set of event names, KEYS[3]: the delayed events' sorted set, KEYS[4..]:
-- the streams of the batch's names.
-- Every ARGV but the third is a list of strings, each behind its length ('>I'): one
-- argument for a batch, not one per entry, spares the client most of its work.
-- ARGV[1]: the entries due now: the index of its stream among KEYS[4..] ('>H') and
--   the entry behind its length.
-- ARGV[2]: per stream of KEYS[4..]: its name, how many groups it has, their names.
-- ARGV[3]: the start of a listener's own stream's key.
-- ARGV[4]: the delayed events: item key, stream index, due time, entry; one after another.
-- ARGV[5]: a time before which a delayed event may come due before a reader looks again.
-- A stream that does not exist (new, or lost with the server's data) gets its groups
-- before its first entry, and each listener a wake-up entry in its own stream, so a
-- blocked reader starts reading it. Returns 1 when the marker was missing: the server
-- lost its data (or this store is new), and the caller writes its listeners back.
local function reader(blob)
  local pos = 1
  return function()
    if pos > #blob then return nil end
    local v
    v, pos = struct.unpack('>Ic0', blob, pos)
    return v
  end
end
local lost = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], '1')
  lost = 1
end
local groups = {}
local nxt = reader(ARGV[2])
for i = 1, #KEYS - 3 do
  local key, name = KEYS[i + 3], nxt()
  local these = {}
  for j = 1, tonumber(nxt()) do these[j] = nxt() end
  groups[i] = these
  if redis.call('EXISTS', key) == 0 then
    redis.call('SADD', KEYS[2], name)
    for _, g in ipairs(these) do
      redis.pcall('XGROUP', 'CREATE', key, g, '0', 'MKSTREAM')
      redis.call('XADD', ARGV[3] .. g, '*', 'w', '1')
    end
  end
end
local blob = ARGV[1]
local pos = 1
while pos <= #blob do
  local k, entry
  k, entry, pos = struct.unpack('>HIc0', blob, pos)
  redis.call('XADD', KEYS[k + 3], '*', 'e', entry)
end
if ARGV[4] ~= '' then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2]
  first = first and tonumber(first) or math.huge
  nxt = reader(ARGV[4])
  while true do
    local item = nxt()
    if item == nil then break end
    local k, due, entry = tonumber(nxt()), nxt(), nxt()
    redis.call('HSET', item, '_k', KEYS[k + 3], 'e', entry)
    redis.call('ZADD', KEYS[3], due, item)
    if tonumber(due) < first and tonumber(due) < tonumber(ARGV[5]) then
      -- Due soon, before whatever a blocked reader waits for: wake the listeners up.
      first = tonumber(due)
      for _, g in ipairs(groups[k]) do
        redis.call('XADD', ARGV[3] .. g, '*', 'w', '1')
      end
    end
  end
end
return lost
