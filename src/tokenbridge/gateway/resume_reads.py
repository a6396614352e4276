"""ResumeReads: the history reads of connections that open together, in one pipeline.

A connection that cannot resume from its feed's memory reads the session's epoch and a page
of its stream (``HGET :meta epoch`` + ``XRANGE :events <id> + COUNT n``) once its feed is
subscribed. In a reconnect storm thousands do so within milliseconds; one redis-py pipeline
each costs the gateway more CPU than the two commands themselves. Here every read asked for
while a round trip is under way (or within the same loop iteration) goes out in the next
pipeline: the same commands, far fewer round trips, and each connection still reads only
after its own subscription was confirmed (the seam stays exact).

Bounded: at most ``max_batch`` reads per pipeline, one pipeline at a time; the queue holds
one entry per opening connection (itself bounded by the connection limits). A command's
error goes to its connection only; a lost connection to Redis (a restart) is retried once,
as redis-py does for single commands, then reported to every read of that pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.wire.keys import Keys

__all__ = ["ResumeReads"]

_Read = tuple[str, str, int, "asyncio.Future[tuple[Any, Any]]"]


class ResumeReads:
    """``await reads.read(session_id, start, count)`` -> ``(epoch or None, entries)``."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        max_batch: int = 500,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.spawn = spawn
        self.max_batch = max_batch
        self.pipelines = 0  # round trips made (reads / pipelines: how well they batch)
        self.reads = 0
        self._queue: list[_Read] = []
        self._sending: list[_Read] = []
        self._running = False

    def __repr__(self) -> str:
        return f"<ResumeReads reads={self.reads} pipelines={self.pipelines}>"

    async def read(self, session_id: str, start: str, count: int) -> tuple[Any, Any]:
        """The session's epoch (bytes, or None) and ``XRANGE events start + COUNT count``."""
        future: asyncio.Future[tuple[Any, Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((session_id, start, count, future))
        if not self._running:
            self._running = True
            self.spawn(self._run()).add_done_callback(self._ended)
        return await future

    async def _run(self) -> None:
        await asyncio.sleep(0)  # the other connections of this loop iteration queue theirs
        while self._queue:
            self._sending = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            await self._send(self._sending)
            self._sending = []
        self._running = False

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A pipeline task cancelled (shutdown), even before it started: its reads fail
        rather than wait forever."""
        if not task.cancelled() and task.exception() is None:
            return
        self._running = False
        for *_, future in self._sending + self._queue:
            if not future.done():
                future.set_exception(ConnectionError("resume reads stopped"))
        self._sending, self._queue = [], []

    async def _send(self, batch: list[_Read]) -> None:
        self.pipelines += 1
        self.reads += len(batch)
        replies: list[Any] = []
        for attempt in (1, 2):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for session_id, start, count, _ in batch:
                        pipe.hget(self.keys.meta(session_id), "epoch")
                        pipe.xrange(self.keys.events(session_id), min=start, max="+", count=count)
                    replies = await pipe.execute(raise_on_error=False)
                break
            except Exception as exc:  # never the fan-out's task group: each read gets it
                if attempt == 2 or not isinstance(exc, REDIS_DOWN_ERRORS):
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    return
        for at, (*_, future) in enumerate(batch):
            if future.done():  # its connection went away meanwhile
                continue
            epoch, entries = replies[2 * at], replies[2 * at + 1]
            error = next((r for r in (epoch, entries) if isinstance(r, Exception)), None)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result((epoch, entries))
