"""Lua scripts, registered once per client; each touches only keys of one session (one slot).

``SESSION_STATE`` returns what a reader needs to start reading a session at a precise point:
the stream's epoch (created if missing, so that plain-XADD producers work too), its last
generated id, its max deleted entry id (Redis 7: tells trimming apart precisely) and its first
retained id. See docs/wire-format.md, "Epochs and resume".
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

__all__ = ["Scripts", "SessionState"]

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


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Scripts:
    """The Lua scripts of tokenbridge, bound to one client."""

    def __init__(self, redis: Redis) -> None:
        self._session_state: AsyncScript = redis.register_script(_SESSION_STATE)

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
        epoch, last, maxdel, first = (_s(v) for v in reply)
        return SessionState(epoch, last, maxdel if maxdel != "0-0" else "", first)
