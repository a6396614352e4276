"""StreamConsumer: an XREADGROUP BLOCK loop that acks an entry only after its handler succeeded.

On start it creates its group idempotently (``MKSTREAM``, ``BUSYGROUP`` tolerated), first
re-reads its own pending entries (``XREADGROUP ... 0``), then blocks for new ones (``>``),
never sleeping between reads. Handlers run as tasks with bounded concurrency; a read asks for
no more entries than there are free slots. Acks are pipelined: finished ids are acked together.

A *keeper* task, every ``heartbeat_s``, refreshes the idle time of the entries it is still
working on (``XCLAIM ... JUSTID``, which does not count as a delivery) so that long handlers
(a minute-long generation) are not taken over, and takes over entries idle longer than
``claim_idle_ms`` on other consumers (``XAUTOCLAIM``): those of crashed processes. Entries
trimmed from the stream while pending are dropped from the pending list and counted.

Redis errors make the loops back off (with jitter) and retry; ``NOGROUP`` (Redis lost the
stream) recreates the group. :meth:`stop` ends reading; in-flight handlers finish (or are
cancelled by the owner's deadline), and nothing is acked that was not processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tokenbridge.store.client import REDIS_DOWN_ERRORS, Backoff, is_busygroup, is_nogroup

__all__ = ["ConsumerStats", "Delivery", "Handler", "StreamConsumer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One entry handed to a handler; ``redelivered`` when it was pending before (reclaimed)."""

    entry_id: str
    fields: dict[bytes, bytes]
    redelivered: bool


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass
class ConsumerStats:
    """Counters of one consumer (past participles, as in metrics)."""

    read: int = 0
    acked: int = 0
    failed: int = 0
    reclaimed: int = 0
    trimmed: int = 0
    last_activity: float = 0.0


class StreamConsumer:
    """One consumer of one group of one stream, running ``handler`` for each entry."""

    def __init__(
        self,
        redis: Redis,
        make_blocking_client: Callable[[], Redis],
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        *,
        concurrency: int = 16,
        block_ms: int = 5000,
        count: int = 100,
        claim_idle_ms: int = 30_000,
        heartbeat_s: float = 5.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.concurrency = concurrency
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.heartbeat_s = heartbeat_s
        self.stats = ConsumerStats()
        self.running = False
        self._make_client = make_blocking_client
        self._stopping = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slot_free = asyncio.Event()
        self._to_ack: list[str] = []
        self._ack_wanted = asyncio.Event()
        self._reader_client_id: int | None = None

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<StreamConsumer {self.stream} {self.group}/{self.consumer} running={self.running} "
            f"read={s.read} acked={s.acked} failed={s.failed} reclaimed={s.reclaimed} "
            f"inflight={len(self._inflight)}>"
        )

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def stop(self) -> None:
        """Stop reading; :meth:`run` returns once in-flight handlers have finished."""
        self._stopping.set()

    async def ensure_group(self) -> None:
        """Create the group at the start of the stream if missing (idempotent)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as exc:
            if not is_busygroup(exc):
                raise

    async def run(self) -> None:
        """Consume until :meth:`stop`; handler tasks are owned and awaited here."""
        self.running = True
        log.info(
            "consumer started stream=%s group=%s consumer=%s",
            self.stream,
            self.group,
            self.consumer,
        )
        try:
            async with asyncio.TaskGroup() as group:
                keeper = group.create_task(self._keep(group))
                acker = group.create_task(self._ack_loop())
                unblocker = group.create_task(self._unblock_on_stop())
                await self._read_loop(group)
                # Drain: let handlers finish, flush their acks, then stop the helpers.
                while self._inflight:
                    await asyncio.wait(list(self._inflight.values()))
                keeper.cancel()
                unblocker.cancel()
                self._ack_wanted.set()
                self._stopping.set()
                await acker
        finally:
            self.running = False
            log.info(
                "consumer stopped stream=%s group=%s consumer=%s",
                self.stream,
                self.group,
                self.consumer,
            )

    async def _read_loop(self, group: asyncio.TaskGroup) -> None:
        backoff = Backoff()
        client = self._make_client()
        pending_cursor: str | None = "0-0"  # own pending entries first
        try:
            await self._retrying(self.ensure_group)
            while not self._stopping.is_set():
                if self._reader_client_id is None:
                    with contextlib.suppress(*REDIS_DOWN_ERRORS):
                        self._reader_client_id = await client.client_id()
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                    continue
                try:
                    cursor = pending_cursor if pending_cursor is not None else ">"
                    reply: Any = await client.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.stream: cursor},
                        count=min(free, self.count),
                        block=None if pending_cursor is not None else self.block_ms,
                    )
                    backoff.reset()
                except REDIS_DOWN_ERRORS as exc:
                    self._reader_client_id = None  # a new connection gets a new id
                    delay = backoff.next()
                    log.warning(
                        "consumer %s lost redis (%s); retrying in %.2fs", self.consumer, exc, delay
                    )
                    await self._sleep_unless_stopping(delay)
                    pending_cursor = "0-0"
                    continue
                except Exception as exc:
                    if not is_nogroup(exc):
                        raise
                    log.warning(
                        "group missing stream=%s group=%s; recreating", self.stream, self.group
                    )
                    await self._retrying(self.ensure_group)
                    pending_cursor = "0-0"
                    continue
                entries = reply[0][1] if reply else []
                if pending_cursor is not None:
                    if not entries:
                        pending_cursor = None
                        continue
                    pending_cursor = entries[-1][0].decode()
                self._dispatch(group, entries, redelivered=pending_cursor is not None)
        finally:
            await client.aclose()

    def _dispatch(
        self,
        group: asyncio.TaskGroup,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
        redelivered: bool,
    ) -> None:
        now = time.time()
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            self.stats.read += 1
            self.stats.last_activity = now
            if not fields:  # trimmed while pending: nothing left to process
                self.stats.trimmed += 1
                self._ack(entry_id)
                continue
            if entry_id in self._inflight:
                continue
            task = group.create_task(self._handle(Delivery(entry_id, fields, redelivered)))
            self._inflight[entry_id] = task

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self.handler(delivery)
        except asyncio.CancelledError:
            raise  # stays pending: another consumer (or our restart) takes it over
        except Exception:
            self.stats.failed += 1
            log.exception(
                "handler failed stream=%s group=%s entry_id=%s; left pending",
                self.stream,
                self.group,
                delivery.entry_id,
            )
        else:
            self._ack(delivery.entry_id)
        finally:
            self._inflight.pop(delivery.entry_id, None)
            self.stats.last_activity = time.time()
            self._slot_free.set()

    def _ack(self, entry_id: str) -> None:
        self._to_ack.append(entry_id)
        self._ack_wanted.set()

    async def _unblock_on_stop(self) -> None:
        """On stop, end the blocked XREADGROUP at once (CLIENT UNBLOCK: as if BLOCK timed out)."""
        await self._stopping.wait()
        if self._reader_client_id is not None:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.redis.client_unblock(self._reader_client_id)

    async def _ack_loop(self) -> None:
        backoff = Backoff()
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            ids, self._to_ack = self._to_ack, []
            if ids:
                try:
                    await self.redis.xack(self.stream, self.group, *ids)
                    self.stats.acked += len(ids)
                    backoff.reset()
                except REDIS_DOWN_ERRORS as exc:
                    # Not acked: the entries stay pending and will be handled again (at least once).
                    log.warning("xack failed for %d entries (%s)", len(ids), exc)
                    await asyncio.sleep(backoff.next())
            if self._stopping.is_set() and not self._inflight and not self._to_ack:
                return

    async def _keep(self, group: asyncio.TaskGroup) -> None:
        """Refresh our in-flight entries and take over those of dead consumers."""
        while True:
            await asyncio.sleep(self.heartbeat_s)  # a timer, not a poll: the work is periodic
            try:
                if self._inflight:
                    await self.redis.xclaim(
                        self.stream, self.group, self.consumer, 0, list(self._inflight), justid=True
                    )
                await self._reclaim(group)
            except REDIS_DOWN_ERRORS as exc:
                log.debug("keeper: redis unavailable (%s)", exc)
            except Exception as exc:
                if not is_nogroup(exc):
                    raise

    async def _reclaim(self, group: asyncio.TaskGroup) -> int:
        """XAUTOCLAIM entries idle past ``claim_idle_ms`` (as many as we have free slots)."""
        cursor = "0-0"
        claimed_total = 0
        while not self._stopping.is_set():
            free = self.concurrency - len(self._inflight)
            if free <= 0:
                break
            reply: Any = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                cursor,
                count=min(free, 100),
            )
            cursor = _str(reply[0])
            entries = [(raw_id, fields) for raw_id, fields in reply[1] if fields is not None]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                self.stats.trimmed += len(deleted)  # XAUTOCLAIM already removed them from the PEL
            claimed_total += len(entries)
            self._dispatch(group, entries, redelivered=True)
            if cursor == "0-0":
                break
        if claimed_total:
            self.stats.reclaimed += claimed_total
            log.info(
                "reclaimed entries stream=%s group=%s consumer=%s count=%d",
                self.stream,
                self.group,
                self.consumer,
                claimed_total,
            )
        return claimed_total

    async def _retrying(self, op: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff()
        while True:
            try:
                await op()
                return
            except REDIS_DOWN_ERRORS as exc:
                delay = backoff.next()
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                await self._sleep_unless_stopping(delay)
                if self._stopping.is_set():
                    return

    async def _sleep_unless_stopping(self, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                await self._stopping.wait()
        except TimeoutError:
            pass


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
