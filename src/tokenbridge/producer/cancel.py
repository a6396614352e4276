"""Cancel a generation from any gateway node.

A request sets the generation's cancel flag in its session's progress record
(``HSET tb:{s}:gens cancel:<gen> 1``) and publishes the generation id on the cancel channel.
The worker running it stops at once on the notice; if the notice is missed (pub/sub is
fire-and-forget), the producer sees the flag with its next write; a job not started yet sees
it when it starts. Either way the stream gets ``end`` with reason ``cancelled``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from redis.asyncio import Redis

from tokenbridge.wire.keys import Keys

__all__ = ["CancelOutcome", "CancelSignal", "request_cancel"]

CancelOutcome = Literal["cancelling", "finished", "not_found"]


class CancelSignal(asyncio.Event):
    """The cancel event of one running generation, with the reason its ``end`` will carry:
    ``cancelled`` (asked for, or shutdown) or ``abandoned`` (no client read it, see
    ``producer/orphans.py``). The first reason given wins."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        if not self.is_set():
            self.reason = reason
            self.set()


async def request_cancel(
    redis: Redis, keys: Keys, generation_id: str, session_id: str | None = None
) -> CancelOutcome:
    """Ask for ``generation_id`` to stop; ``session_id``, if given, must be its session."""
    raw: Any = await redis.get(keys.generation(generation_id))
    if raw is None:
        return "not_found"
    owner = raw.decode()
    if session_id is not None and owner != session_id:
        return "not_found"  # do not tell a client about another session's generations
    gens = keys.generations(owner)
    record: Any = await redis.hget(gens, generation_id)
    if record is not None and record.startswith(b"done"):
        return "finished"
    # Two commands, not a pipeline: on Redis Cluster, PUBLISH has no key to route a pipeline
    # by (any node relays it to the whole cluster).
    await redis.hset(gens, Keys.cancel_field(generation_id), 1)
    await redis.publish(keys.cancel_channel, generation_id)
    return "cancelling"


async def cancel_requested(redis: Redis, keys: Keys, session_id: str, generation_id: str) -> bool:
    """Was a cancel asked for before the generation started?"""
    flag: Any = await redis.hget(keys.generations(session_id), Keys.cancel_field(generation_id))
    return flag is not None
