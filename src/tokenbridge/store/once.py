"""ApplyOnce: apply an entry's effect exactly once, even when the entry is delivered twice.

Consumer groups deliver at least once: a handler that crashed after applying its effect but
before its ``XACK`` sees the entry again. ``ApplyOnce`` makes counter effects exact: one Lua
script records the entry id (``SET marker NX PX ttl``) and applies the increments in the same
atomic step, or does nothing if the id was recorded before. The record expires after
``ttl_ms``, which must exceed the longest time an entry can stay pending (reclaim time times
max deliveries, with margin).

All keys of one call must hash to one Cluster slot: the marker is named after ``scope``, so
give ``scope`` and the counter keys the same hash tag (``tb:{stats}:once``, ``tb:{stats}:total``).
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbridge.wire.keys import Keys

__all__ = ["ApplyOnce"]

_APPLY_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local i = 2
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    local amount = ARGV[i + 1]
    if string.find(amount, '.', 1, true) then
      redis.call('HINCRBYFLOAT', KEYS[k], ARGV[i], amount)
    else
      redis.call('HINCRBY', KEYS[k], ARGV[i], amount)
    end
    i = i + 2
  end
end
return 1
"""


class ApplyOnce:
    """Hash-counter increments applied at most once per (scope, entry id)."""

    def __init__(self, redis: Redis, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms
        self._script: AsyncScript = redis.register_script(_APPLY_ONCE)

    async def hincrby(
        self, scope: str, entry_id: str, increments: dict[str, dict[str, int | float]]
    ) -> bool:
        """Apply ``{hash_key: {field: amount}}`` once for ``entry_id``; False if already applied.

        Integer amounts use HINCRBY, floats HINCRBYFLOAT.
        """
        keys = [Keys.once(scope, entry_id)]
        args: list[str | int] = [self.ttl_ms]
        for key, fields in increments.items():
            keys.append(key)
            args.append(len(fields))
            for field, amount in fields.items():
                args.append(field)
                args.append(f"{amount:.9f}" if isinstance(amount, float) else str(amount))
        applied = await self._script(keys=keys, args=args)
        return bool(applied)
