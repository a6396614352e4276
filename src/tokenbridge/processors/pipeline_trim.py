"""PipelineTrimmer: trims the pipeline shards below what the processors have finished, and
counts, never hides, what a length cap has to drop.

A pipeline shard must not lose an entry that no processor has read, so the producer's own
``XADD ... MAXLEN ~`` is only a far backstop (twice ``pipeline_max_len``, for a pipeline
nobody consumes). The real trimming is this periodic task, run by every StreamProcessor (the
script is atomic, so several processes running it at once is harmless). Per shard, one Lua
script:

1. **safe trim**: ``XTRIM MINID`` to the oldest entry the ``processors`` group still needs:
   its oldest pending entry, else the entry after its last-delivered id. Nothing a processor
   could still read is dropped.
2. **cap**: if more than ``pipeline_max_len`` entries remain (the processors are stalled or
   too slow), ``XTRIM MAXLEN`` exactly to the cap. What it drops is *lost* to the processors.
3. **accounting**: when the group's last-delivered id is now before the first entry kept,
   every kept entry is undelivered: the true lag is ``XLEN``. Whatever the group's read
   counter (``entries-added - entries-read``) says waits beyond that is lost entries (dropped
   by the cap, or by anyone else); they are counted and the group is moved past them
   (``XGROUP SETID ... ENTRIESREAD``), so ``lag`` shows only what really waits. Pending
   entries below the first kept entry (delivered, then dropped) are acked and counted as lost
   too (a live consumer may still finish one: counted anyway).

Lost entries are added to the hash ``<prefix>:pipeline:lost`` (field: shard; shown by
``tokenbridge stats`` and ``GET /v1/stats``), counted in this process (metrics) and logged
once per trim with their id range. See docs/operations.md, "Pipeline trimming".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.wire.keys import Keys

__all__ = ["PipelineTrimmer", "TrimResult"]

log = logging.getLogger(__name__)

_MAX_LOST_PENDING = 10_000  # pending entries acked per run (the rest next run): bounded work

_TRIM = """
local key, group, cap, max_pending = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', key) == 0 then return {0, 0, 0, 0, '', ''} end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  if am ~= bm then return am < bm end
  return as < bs
end
local function next(id)
  local ms, seq = parse(id)
  if seq >= 9007199254740992 then return string.format('%d-0', ms + 1) end
  return string.format('%d-%d', ms, seq + 1)
end
local function prev(id)
  local ms, seq = parse(id)
  if seq > 0 then return string.format('%d-%d', ms, seq - 1) end
  return string.format('%d-18446744073709551615', ms - 1)
end
local last, read = nil, nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == group then last = info['last-delivered-id']; read = info['entries-read'] end
end
local safe = 0
if last then
  local summary = redis.call('XPENDING', key, group)
  local minid
  if tonumber(summary[1]) > 0 then
    minid = summary[2]
  else
    minid = next(last)
  end
  safe = redis.call('XTRIM', key, 'MINID', minid)
end
local capped, lost_first = 0, ''
local len = redis.call('XLEN', key)
if len > cap then
  lost_first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1][1]
  capped = redis.call('XTRIM', key, 'MAXLEN', cap)
  len = len - capped
end
if not last then return {safe, capped, capped, 0, lost_first, ''} end
local first = ''
local head = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
if head[1] then first = head[1][1] end
local lost_undelivered = 0
local stream = redis.call('XINFO', 'STREAM', key)
local info = {}
for i = 1, #stream, 2 do info[stream[i]] = stream[i + 1] end
local before_first = (first == '' and less(last, info['last-generated-id']))
  or (first ~= '' and less(last, first))
if before_first then
  -- Every entry kept is undelivered: what the group's counter says waits beyond them was lost.
  local added, waiting = tonumber(info['entries-added']), nil
  if read then waiting = added - tonumber(read)
  elseif last == '0-0' then waiting = added end
  if waiting then lost_undelivered = waiting - len else lost_undelivered = capped end
  if lost_undelivered > 0 or not read then
    local to = info['last-generated-id']
    if first ~= '' then to = prev(first) end
    redis.call('XGROUP', 'SETID', key, group, to, 'ENTRIESREAD', added - len)
  end
  if lost_undelivered < 0 then lost_undelivered = 0 end
end
local below = {}
if first == '' then
  below = redis.call('XPENDING', key, group, '-', '+', max_pending)
else
  below = redis.call('XPENDING', key, group, '-', '(' .. first, max_pending)
end
for _, row in ipairs(below) do redis.call('XACK', key, group, row[1]) end
return {safe, capped, lost_undelivered, #below, lost_first, first}
"""


@dataclass(frozen=True, slots=True)
class TrimResult:
    """One shard's trim: entries dropped safely, by the cap, and lost to the processors."""

    safe: int
    capped: int
    lost_undelivered: int
    lost_pending: int
    lost_from: str
    kept_from: str

    @property
    def lost(self) -> int:
        return self.lost_undelivered + self.lost_pending


class PipelineTrimmer:
    """Every ``interval_s``, trims each pipeline shard (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        group: str,
        shards: int,
        max_len: int,
        interval_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.group = group
        self.shards = shards
        self.max_len = max_len
        self.interval_s = interval_s
        self.trimmed = 0  # entries dropped safely (processed by every processor)
        self.lost = 0  # entries dropped before every processor was done with them
        self._script: AsyncScript = redis.register_script(_TRIM)
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        return f"<PipelineTrimmer shards={self.shards} trimmed={self.trimmed} lost={self.lost}>"

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Trim every ``interval_s`` until :meth:`stop`; Redis errors wait for the next run."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):  # a timer, stopped by stop()
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                await self.trim_all()
            except REDIS_DOWN_ERRORS as exc:
                log.debug("pipeline trim skipped (%s)", exc)
            except Exception as exc:  # a shard in a bad state must not stop the processors
                log.warning("pipeline trim failed (%r); retrying next time", exc)

    async def trim_all(self) -> list[TrimResult]:
        """One pass over every shard."""
        return [await self.trim(shard) for shard in range(self.shards)]

    async def trim(self, shard: int) -> TrimResult:
        """Trim one shard; count and log what was lost."""
        key = self.keys.pipeline(shard)
        reply: Any = await self._script(
            keys=[key], args=[self.group, self.max_len, _MAX_LOST_PENDING]
        )
        safe, capped, undelivered, pending = (int(v) for v in reply[:4])
        result = TrimResult(safe, capped, undelivered, pending, _s(reply[4]), _s(reply[5]))
        self.trimmed += safe
        if result.lost:
            self.lost += result.lost
            await self.redis.hincrby(self.keys.pipeline_lost, str(shard), result.lost)
            log.warning(
                "pipeline entries lost to the processors stream=%s lost=%d undelivered=%d "
                "pending=%d ids=%s..(before %s) cap=%d (TOKENBRIDGE_PIPELINE_MAX_LEN)",
                key, result.lost, undelivered, pending, result.lost_from or "?",
                result.kept_from or "end", self.max_len,
            )  # fmt: skip
        return result


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
