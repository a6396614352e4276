"""Lua scripts, registered once per client; each touches only keys of one session (one slot).

``SESSION_STATE`` returns what a reader needs to start reading a session at a precise point:
the stream's epoch (created if missing, so that plain-XADD producers work too), its last
generated id, its max deleted entry id (Redis 7: tells trimming apart precisely) and its first
retained id. See docs/wire-format.md, "Epochs and resume".

``RATE_LIMIT`` is the GCRA of the rate limits (docs/architecture.md, "Rate limits"): one hash
per limited scope holds, per limit, its theoretical arrival time in microseconds of Redis's
own clock (``TIME``), so every process agrees on time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbridge.text import as_text

__all__ = ["RateLimitCheck", "Scripts", "SessionState"]

_SESSION_STATE = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local exists = redis.call('EXISTS', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
if ARGV[3] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  if exists == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
end
if exists == 0 then
  return {epoch, '', '', ''}
end
local info = redis.call('XINFO', 'STREAM', KEYS[2])
local last, maxdel, first = '', '', ''
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'last-generated-id' then last = info[i + 1]
  elseif k == 'max-deleted-entry-id' then maxdel = info[i + 1]
  elseif k == 'first-entry' then
    if info[i + 1] then first = info[i + 1][1] end
  end
end
return {epoch, last, maxdel, first}
"""


_RATE_LIMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
if mode == 'charge' then
  if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then
    return {-1, 0}
  end
end
local new = {}
for i = 0, (#ARGV - 2) / 5 - 1 do
  local b = 3 + i * 5
  local field = ARGV[b]
  local interval, tau = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local cost, take = tonumber(ARGV[b + 3]), ARGV[b + 4] == '1'
  local tat = tonumber(redis.call('HGET', KEYS[1], field) or '0')
  if tat < now then tat = now end
  if mode == 'admit' then
    local next = tat + cost * interval
    if next - now > tau then
      return {i + 1, next - tau - now}
    end
    if take then new[field] = next end
  elseif mode == 'charge' then
    new[field] = tat + cost * interval
  else
    new[field] = math.max(now, tat - cost * interval)
  end
end
local horizon = 0
for field, tat in pairs(new) do
  redis.call('HSET', KEYS[1], field, string.format('%.0f', tat))
  if tat - now > horizon then horizon = tat - now end
end
local ms = math.ceil(horizon / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('PEXPIRE', KEYS[1], ms)
end
return {0, 0}
"""


@dataclass(frozen=True, slots=True)
class RateLimitCheck:
    """One limit of a :meth:`Scripts.rate_limit` call: ``count`` per ``period_s`` seconds.

    ``cost`` is what the call asks for (or charges); ``take`` is False for a check that only
    asks whether ``cost`` would still fit (token budgets are charged later, as they are used).
    """

    field: str
    count: int
    period_s: float
    cost: int = 1
    take: bool = True


@dataclass(frozen=True, slots=True)
class SessionState:
    """A session stream's state at one instant; ids are '' where the stream has none."""

    epoch: str
    last_id: str
    max_deleted_id: str
    first_id: str

    @property
    def exists(self) -> bool:
        return bool(self.last_id)


class Scripts:
    """The Lua scripts of tokenbridge, bound to one client."""

    def __init__(self, redis: Redis) -> None:
        self._session_state: AsyncScript = redis.register_script(_SESSION_STATE)
        self._rate_limit: AsyncScript = redis.register_script(_RATE_LIMIT)

    async def session_state(
        self,
        meta_key: str,
        events_key: str,
        new_epoch: str,
        orphan_ttl_ms: int,
        extend_ttl_ms: int | None = None,
    ) -> SessionState:
        """Read (and create if missing) the epoch and id bounds of a session stream.

        ``extend_ttl_ms`` (producers) sets the TTL of both keys; ``orphan_ttl_ms`` bounds the
        life of a meta key created for a stream that does not exist (yet).
        """
        reply = await self._session_state(
            keys=[meta_key, events_key],
            args=[new_epoch, orphan_ttl_ms, "" if extend_ttl_ms is None else extend_ttl_ms],
        )
        epoch, last, maxdel, first = (as_text(v) for v in reply)
        return SessionState(epoch, last, maxdel if maxdel != "0-0" else "", first)

    async def rate_limit(
        self,
        mode: Literal["admit", "charge", "refund"],
        key: str,
        checks: Sequence[RateLimitCheck],
        once_key: str = "",
        once_ttl_ms: int = 0,
    ) -> tuple[int, float]:
        """Run the GCRA over ``checks`` of the scope hash ``key``, atomically.

        ``admit``: if every check fits, apply those that ``take`` and return ``(0, 0.0)``;
        else change nothing and return ``(n, retry_after_s)`` for the first check ``n``
        (1-based) that does not fit. ``charge``: add every cost, fitting or not (a debt
        delays later admits), once per ``once_key`` (kept ``once_ttl_ms``; same slot as
        ``key``): ``(-1, 0.0)`` if it was charged before. ``refund``: take back an admit's
        costs.
        """
        args: list[str | int] = [mode, once_ttl_ms]
        for check in checks:
            interval_us = round(check.period_s * 1_000_000 / check.count)
            tau_us = round(check.period_s * 1_000_000)
            args += [check.field, interval_us, tau_us, check.cost, int(check.take)]
        keys = [key, once_key] if mode == "charge" else [key]
        refused, retry_us = await self._rate_limit(keys=keys, args=args)
        return int(refused), int(retry_us) / 1_000_000
