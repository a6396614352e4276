"""OrphanWatch: a worker cancels, as ``abandoned``, the generations no client reads anywhere.

A generation that is not ``background`` and has run for ``orphan_grace_s`` is watched through
its session's presence key (``<prefix>:{<session>}:presence``), which every gateway node with
a live connection to the session keeps alive (``gateway/presence.py``) with a TTL of
``orphan_grace_s`` plus its refresh interval. When the key is gone, no client has read the
session on any node for at least ``orphan_grace_s``: the generation's :class:`CancelSignal` is
set with reason ``abandoned``, the model call stops, and the stream ends with
``end reason=abandoned``. A generation that nobody ever connected to gets the same grace,
counted from its start on this worker.

Bounded: one task per worker process, one pipelined ``EXISTS`` per running generation every
``check_s`` (at most the worker heartbeat, at most a quarter of the grace). Redis errors skip
a round; they never cancel anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.asyncio import Redis

from tokenbridge.producer.cancel import CancelSignal
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.wire.keys import Keys

__all__ = ["OrphanWatch"]

log = logging.getLogger(__name__)

_CHUNK = 1000  # keys per pipelined round trip


@dataclass(slots=True)
class _Watched:
    session_id: str
    started: float  # time.monotonic() when it started here
    signal: CancelSignal


class OrphanWatch:
    """The running generations of one worker that may be abandoned, and the loop that checks."""

    def __init__(self, redis: Redis, keys: Keys, grace_s: float, heartbeat_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.grace_s = grace_s
        self.check_s = max(0.05, min(heartbeat_s, grace_s / 4))
        self.abandoned = 0  # signals set (the worker counts the outcomes)
        self._watched: dict[str, _Watched] = {}  # generation id -> its watch; bounded by jobs

    def __repr__(self) -> str:
        return f"<OrphanWatch watched={len(self._watched)} abandoned={self.abandoned}>"

    def watch(self, job: GenerationJob, signal: CancelSignal) -> None:
        """Watch ``job`` while it runs (nothing for a background job)."""
        if not job.background:
            self._watched[job.generation_id] = _Watched(job.session_id, time.monotonic(), signal)

    def forget(self, generation_id: str) -> None:
        self._watched.pop(generation_id, None)

    async def run(self) -> None:
        """Check every ``check_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.check_s)  # a timer: the rule is about elapsed time
            try:
                await self.check()
            except REDIS_DOWN_ERRORS as exc:
                log.debug("orphan check skipped (%s)", exc)

    async def check(self) -> None:
        """Cancel, as abandoned, every watched generation past its grace nobody reads."""
        due_by = time.monotonic() - self.grace_s
        due = [
            (gid, w)
            for gid, w in self._watched.items()
            if w.started <= due_by and not w.signal.is_set()
        ]
        for start in range(0, len(due), _CHUNK):
            chunk = due[start : start + _CHUNK]
            async with self.redis.pipeline(transaction=False) as pipe:
                for _, watched in chunk:
                    pipe.exists(self.keys.presence(watched.session_id))
                present = await pipe.execute()
            for (gid, watched), read in zip(chunk, present, strict=True):
                if not read:
                    log.info(
                        "generation abandoned session=%s generation=%s grace_s=%s",
                        watched.session_id, gid, self.grace_s,
                    )  # fmt: skip
                    self.abandoned += 1
                    watched.signal.cancel("abandoned")
