"""An example processor: the most frequent tokens of all answers, counted exactly once.

Run it inside tokenbridge (any process that runs processors loads it)::

    PYTHONPATH=docs/examples TOKENBRIDGE_PROCESSORS_EXTRA=my_processor:TokenFrequency \\
        tokenbridge serve
    redis-cli -p <port> ZREVRANGE 'tb:{tokens}:frequency' 0 9 WITHSCORES

A processor is any object with a ``name`` and an ``async def process(batch, entry_id)``;
``TOKENBRIDGE_PROCESSORS_EXTRA`` names a factory called with a ``ProcessorContext`` (a class
whose ``__init__`` takes it is one). ``process`` may see a batch twice (at-least-once delivery,
a replay from the dead letters) and in any order, so its effect is made idempotent: one Lua
script records the batch's ``once_key`` and applies the counts in the same atomic step. All
keys of the script carry the hash tag ``{tokens}``, so it also runs on Redis Cluster.
"""

from __future__ import annotations

from collections import Counter

from tokenbridge import PipelineBatch, ProcessorContext

_COUNT_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i])
end
return 1
"""


class TokenFrequency:
    """Counts each token text (stripped, lower case) of every answer in a sorted set."""

    name = "token_frequency"

    def __init__(self, context: ProcessorContext) -> None:
        self.redis = context.redis
        self.key = f"{context.keys.prefix}:{{tokens}}:frequency"
        self.once_prefix = f"{context.keys.prefix}:{{tokens}}:once:"
        self._count_once = context.redis.register_script(_COUNT_ONCE)
        self.once_ttl_ms = context.settings.once_ttl_ms()  # as long as redelivery can happen

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        counts = Counter(e.text.strip().lower() for e in batch.events if e.kind == "token")
        counts.pop("", None)
        if not counts:
            return
        args: list[str | int] = [self.once_ttl_ms]
        for token, n in counts.items():
            args += [token, n]
        await self._count_once(keys=[self.key, self.once_prefix + batch.once_key], args=args)

    async def aclose(self) -> None:
        """Called when the StreamProcessor closes; nothing to release here."""
