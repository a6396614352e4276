"""ResumeReads: the history reads of connections that open together, in one pipeline.

A connection that cannot resume from its feed's memory reads the session's epoch and a page
of its stream (``HGET :meta epoch`` + ``XRANGE :events <id> + COUNT n``) once its feed is
subscribed. In a reconnect storm thousands do so within milliseconds; one redis-py pipeline
each costs the gateway more CPU than the two commands themselves. Here every read asked for
while a round trip is under way (or within the same loop iteration) goes out in the next
pipeline, and each connection still reads only after its own subscription was confirmed (the
seam stays exact).

On standalone Redis the pages of a pipeline are one ``XREAD COUNT n STREAMS k1 k2 … id1 id2 …``
rather than one ``XRANGE`` each (a reconnect storm's history in one command): XREAD's ids are
exclusive, so each is the id just before the resume id (:func:`just_before`), which keeps
XRANGE's meaning (the resume id included: finding it proves it was not trimmed). COUNT is per
stream, a missing stream is left out of the reply (an empty page, as XRANGE gives), and a
stream named twice in one batch goes into a second XREAD. On a cluster a multi-key XREAD must
name keys of one slot, i.e. mostly one session: each page stays an ``XRANGE``.

Bounded: at most ``max_batch`` reads per pipeline, one pipeline at a time; the queue holds
one entry per opening connection (itself bounded by the connection limits). A command's
error goes to its connection only; a lost connection to Redis (a restart) is retried once,
as redis-py does for single commands, then reported to every read of that pipeline.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Coroutine
from typing import Any

from tokenbridge.store.client import REDIS_DOWN_ERRORS, is_cluster
from tokenbridge.wire.keys import Keys

__all__ = ["ResumeReads", "just_before"]

_Read = tuple[str, str, int, "asyncio.Future[tuple[Any, Any]]"]
_ENTRY_ID = re.compile(r"^(\d+)-(\d+)$")
_SEQ_MAX = 2**64 - 1


def just_before(start: str) -> str | None:
    """The greatest stream id below ``start`` (``-``: from the first entry), so that XREAD,
    exclusive, reads from ``start`` included; None for a start it cannot take (XRANGE then)."""
    if start == "-":
        return "0-0"
    match = _ENTRY_ID.match(start)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-{_SEQ_MAX}" if ms > 0 else "0-0"


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
        self.xreads = 0  # multi-stream XREADs sent (standalone)
        self._many = not is_cluster(redis)  # one XREAD may name every stream
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
            run = self._run()
            try:
                task = self.spawn(run)
            except BaseException:  # the fan-out is not running: fail this read, not hang later
                run.close()
                self._queue.clear()  # only this read: the others spawned or were failed
                raise
            self._running = True
            task.add_done_callback(self._ended)
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
                replies = await self._pipeline(batch)
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

    async def _pipeline(self, batch: list[_Read]) -> list[Any]:
        """``[epoch, page]`` per read, flattened; an error stands in for a failed command."""
        xreads: list[tuple[int, dict[str, tuple[int, str]]]] = []  # (count, key -> (at, id))
        async with self.redis.pipeline(transaction=False) as pipe:
            for at, (session_id, start, count, _) in enumerate(batch):
                pipe.hget(self.keys.meta(session_id), "epoch")
                key, after = self.keys.events(session_id), just_before(start)
                if not self._many or after is None:
                    pipe.xrange(key, min=start, max="+", count=count)
                    continue
                group = next((g for c, g in xreads if c == count and key not in g), None)
                if group is None:
                    group = {}
                    xreads.append((count, group))
                group[key] = (at, after)
            for count, group in xreads:
                pipe.xread({key: after for key, (_, after) in group.items()}, count=count)
            replies = await pipe.execute(raise_on_error=False)
        tail = len(replies) - len(xreads)
        for n, (count, group) in enumerate(xreads):
            reply = replies[tail + n]
            if isinstance(reply, Exception):  # one bad key fails them all
                replies[tail + n] = await self._one_by_one(batch, count, group)
            else:
                replies[tail + n] = _by_key(reply)
        return self._split(batch, replies, xreads)

    async def _one_by_one(
        self, batch: list[_Read], count: int, group: dict[str, tuple[int, str]]
    ) -> dict[str, Any]:
        """A failed XREAD's pages read again as one XRANGE each, so that an error (a key
        that is not a stream) reaches its own connection only."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, (at, _) in group.items():
                pipe.xrange(key, min=batch[at][1], max="+", count=count)
            pages = await pipe.execute(raise_on_error=False)
        return dict(zip(group, pages, strict=True))

    def _split(
        self,
        batch: list[_Read],
        replies: list[Any],
        xreads: list[tuple[int, dict[str, tuple[int, str]]]],
    ) -> list[Any]:
        """The pipeline's replies back in ``[epoch, page]`` order per read (each XREAD's
        reply is, by now, stream key -> page)."""
        out: list[Any] = []
        tail = replies[len(replies) - len(xreads) :] if xreads else []
        pages: dict[int, Any] = {}
        for (_, group), reply in zip(xreads, tail, strict=True):
            self.xreads += 1
            for key, (at, _) in group.items():
                pages[at] = reply.get(key, [])  # a missing stream is left out of the reply
        head = replies[: len(replies) - len(xreads)]
        at_reply = 0
        for at in range(len(batch)):
            out.append(head[at_reply])  # the epoch
            at_reply += 1
            if at in pages:
                out.append(pages[at])
            else:
                out.append(head[at_reply])  # its own XRANGE
                at_reply += 1
        return out


def _by_key(reply: Any) -> dict[str, Any]:
    """An XREAD reply as stream key -> entries (RESP2: ``[[key, entries], ...]``; RESP3, as
    redis-py parses it: ``{key: [entries]}``)."""
    if not reply:
        return {}
    if isinstance(reply, dict):
        return {_name(key): value[0] for key, value in reply.items()}
    return {_name(key): entries for key, entries in reply}


def _name(key: Any) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)
