"""Reclaimer: keeps a consumer's own entries, takes over those of dead consumers, tidies up.

Every ``heartbeat_s``, for its :class:`StreamConsumer`:

1. refreshes the idle time of the entries it is still working on (``XCLAIM ... JUSTID``, which
   does not count as a delivery), so a long handler (a minute-long generation) is not taken over;
2. takes over entries idle longer than ``claim_idle_ms`` on any consumer (``XAUTOCLAIM``): those
   of crashed processes. They are handed to the consumer's handlers as redeliveries. Entries
   trimmed from the stream while pending come back as deleted ids: XAUTOCLAIM has already
   dropped them from the pending list; they are counted as ``trimmed``. When there are more
   idle entries than free handler slots, a drain task goes on claiming as slots free up
   (not once per heartbeat), so a survivor drains a crashed process's entries at the pace
   of its handlers, within about ``claim_idle_ms``, whatever their number; the rest stay
   pending in Redis meanwhile, so memory stays bounded by the consumer's concurrency;
3. now and then deletes consumers of the group that hold nothing and have been idle for a long
   time (``XGROUP DELCONSUMER``): names of processes that are gone. A live consumer deleted by
   mistake is recreated by its next read, so this is safe.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from redis.asyncio import Redis

from tokenbridge.store.client import REDIS_DOWN_ERRORS, is_nogroup
from tokenbridge.text import as_text

__all__ = ["ReclaimTarget", "Reclaimer"]


class _Counts(Protocol):
    reclaimed: int
    trimmed: int


class ReclaimTarget(Protocol):
    """What the reclaimer needs of its consumer (``StreamConsumer`` is one): declared here so
    that this module does not import the consumer that owns it."""

    redis: Redis
    stream: str
    group: str
    consumer: str
    concurrency: int

    @property
    def stats(self) -> _Counts: ...

    @property
    def inflight(self) -> int: ...

    @property
    def inflight_ids(self) -> list[str]: ...

    @property
    def stopping(self) -> bool: ...

    async def dispatch(self, entries: list[tuple[Any, Any]], redelivered: bool) -> None: ...


log = logging.getLogger(__name__)

_CLEANUP_EVERY = 12  # heartbeats
_DEAD_CONSUMER_IDLE_MS = 3_600_000


class Reclaimer:
    """The periodic upkeep of one consumer (a timer, not a poll: the work is periodic)."""

    def __init__(self, consumer: ReclaimTarget, claim_idle_ms: int, heartbeat_s: float) -> None:
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.heartbeat_s = heartbeat_s
        self._beats = 0
        self.more = False  # idle entries were left for lack of free slots
        self.backlog = asyncio.Event()  # set while there are: the drain task claims on
        self.slot_freed = asyncio.Event()  # set by the consumer when a handler finishes

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._drain())
            while True:
                await asyncio.sleep(self.heartbeat_s)
                await self._guarded(self.tick)

    async def _guarded(self, step: Any) -> None:
        try:
            await step()
        except REDIS_DOWN_ERRORS as exc:
            log.debug("reclaimer: redis unavailable (%s)", exc)
        except Exception as exc:
            if not is_nogroup(exc):
                raise

    async def tick(self) -> None:
        c = self.consumer
        inflight: list[Any] = c.inflight_ids
        if inflight:
            await c.redis.xclaim(c.stream, c.group, c.consumer, 0, list(inflight), justid=True)
        if not self.backlog.is_set():
            await self.reclaim()
            if self.more:
                self.backlog.set()
        self._beats += 1
        if self._beats % _CLEANUP_EVERY == 0:
            await self.forget_dead_consumers()

    async def _drain(self) -> None:
        """While idle entries are left over, claim more each time handler slots free up."""
        while True:
            await self.backlog.wait()
            c = self.consumer
            while self.more and not c.stopping:
                self.slot_freed.clear()
                if c.concurrency - c.inflight <= 0:
                    await self.slot_freed.wait()
                    await asyncio.sleep(0)  # let the handlers that finish together free up
                    continue
                self.more = False
                await self._guarded(self.reclaim)
            self.backlog.clear()
            if c.stopping:
                return

    async def reclaim(self) -> int:
        """XAUTOCLAIM idle entries, as many as the consumer has free slots for; sets
        :attr:`more` when it stopped for lack of slots with entries possibly left."""
        c = self.consumer
        cursor = "0-0"
        claimed_total = 0
        self.more = False
        while not c.stopping:
            free = c.concurrency - c.inflight
            if free <= 0:
                self.more = claimed_total > 0
                break
            reply: Any = await c.redis.xautoclaim(
                c.stream, c.group, c.consumer, self.claim_idle_ms, cursor, count=min(free, 100)
            )
            cursor = as_text(reply[0])
            entries = [(raw_id, fields) for raw_id, fields in reply[1] if fields is not None]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                c.stats.trimmed += len(deleted)
            if entries:
                claimed_total += len(entries)
                await c.dispatch(entries, redelivered=True)
            if cursor == "0-0":
                break
        if claimed_total:
            c.stats.reclaimed += claimed_total
            log.info(
                "reclaimed entries stream=%s group=%s consumer=%s count=%d",
                c.stream,
                c.group,
                c.consumer,
                claimed_total,
            )
        return claimed_total

    async def forget_dead_consumers(self) -> int:
        """Delete consumers with nothing pending, idle for an hour: names of gone processes."""
        c = self.consumer
        rows: Any = await c.redis.xinfo_consumers(c.stream, c.group)
        removed = 0
        for row in rows:
            name = as_text(row["name"])
            if (
                name != c.consumer
                and int(row["pending"]) == 0
                and int(row["idle"]) > max(_DEAD_CONSUMER_IDLE_MS, self.claim_idle_ms * 10)
            ):
                await c.redis.xgroup_delconsumer(c.stream, c.group, name)
                removed += 1
        if removed:
            log.info(
                "forgot idle consumers stream=%s group=%s count=%d", c.stream, c.group, removed
            )
        return removed

    async def forget_self(self) -> None:
        """On a clean stop: delete our own consumer name if it holds nothing."""
        c = self.consumer
        try:
            rows: Any = await c.redis.xpending_range(
                c.stream, c.group, "-", "+", 1, consumername=c.consumer
            )
            if not rows:
                await c.redis.xgroup_delconsumer(c.stream, c.group, c.consumer)
        except REDIS_DOWN_ERRORS:
            pass  # best effort: an idle name is removed by the others' reclaim later
        except Exception as exc:
            if not is_nogroup(exc):  # the group is gone (Redis lost it): nothing to forget
                raise
