-- tokenbridge: append one batch of events to a session stream and publish it (docs/wire-format.md).
-- Loaded as APPEND_SCRIPT by store/live.py: the script every producer runs.
local events, meta, gens, channel = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local gen = ARGV[2]
local epoch = redis.call('HGET', meta, 'epoch')
local record = redis.call('HGET', gens, gen)
if record == ARGV[3] then
  -- this very batch was written already (a retry whose first reply was lost)
  return {redis.call('HGET', gens, 'cancel:' .. gen) or '', epoch or '', 0, 'applied', -1}
end
-- a state's writer token ("running <seq> <token>"); nil for writers that send none
local function writer(state) return string.match(state, '^%a+ %-?%d+ (%x+)$') end
if record and (string.sub(record, 1, 5) == 'done '
    or (ARGV[4] == '' and writer(ARGV[3]) and writer(record) and writer(record) ~= writer(ARGV[3]))) then
  -- ended by another (worker_lost, generation_lost): nothing may follow its terminal event;
  -- or the first batch of a writer meeting another writer's record (a job delivered twice)
  return {'', epoch or '', 0, 'ended', -1}
end
local lost = 0
if ARGV[4] ~= '' and record ~= ARGV[4] then
  epoch = false
  lost = 1
end
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', meta, 'epoch', epoch)
  if redis.call('TTL', meta) < 0 then redis.call('EXPIRE', meta, ARGV[7]) end
end
local prev = '0-0'
local tail = redis.call('XREVRANGE', events, '+', '-', 'COUNT', 1)
if tail[1] then prev = tail[1][1] end
-- trim: "<count>" (MAXLEN ~ count), or "<count> <history s> <hard max>" (below)
local keep, history, hard = string.match(ARGV[1], '^(%d+) (%d+) (%d+)$')
if not keep then hard = ARGV[1] end
local total = tonumber(ARGV[8])
local out = {'*3\r\n$', #epoch, '\r\n', epoch, '\r\n$', #prev, '\r\n', prev, '\r\n*',
             total, '\r\n'}
local n = #out
local i = 9
local id = prev
for _ = 1, total do
  local k = tonumber(ARGV[i])
  id = redis.call('XADD', events, 'MAXLEN', '~', hard, '*', unpack(ARGV, i + 1, i + k))
  out[n + 1] = '*2\r\n$'; out[n + 2] = #id; out[n + 3] = '\r\n'; out[n + 4] = id
  out[n + 5] = '\r\n*'; out[n + 6] = k; out[n + 7] = '\r\n'
  n = n + 7
  for j = i + 1, i + k do
    local v = ARGV[j]
    out[n + 1] = '$'; out[n + 2] = #v; out[n + 3] = '\r\n'; out[n + 4] = v
    out[n + 5] = '\r\n'
    n = n + 5
  end
  i = i + k + 1
end
local readers = redis.call('SPUBLISH', channel, table.concat(out))
if keep then
  -- past <count> entries, trim only those older than <history s>, never below <count>
  local excess = redis.call('XLEN', events) - tonumber(keep)
  if excess > 0 then
    local now = redis.call('TIME')
    local oldest = now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(history) * 1000
    redis.call('XTRIM', events, 'MINID', '~', oldest, 'LIMIT', excess)
  end
end
redis.call('HSET', gens, gen, ARGV[3])
local cancel = redis.call('HGET', gens, 'cancel:' .. gen) or ''
if ARGV[5] ~= '' then
  redis.call('EXPIRE', events, ARGV[5])
  redis.call('EXPIRE', gens, ARGV[5])
  redis.call('EXPIRE', meta, ARGV[5])
end
return {cancel, epoch, lost, id, readers}
