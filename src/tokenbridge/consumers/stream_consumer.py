"""StreamConsumer: an XREADGROUP BLOCK loop that acks an entry only after its handler succeeded.

On start it creates its group idempotently (``MKSTREAM``, ``BUSYGROUP`` tolerated), first
re-reads its own pending entries (``XREADGROUP ... 0``), then blocks for new ones (``>``),
never sleeping between reads. Handlers run as tasks with bounded concurrency; a read asks for
no more entries than there are free slots. Acks are pipelined: finished ids are acked together.

Failures: a handler raising :class:`InvalidEntry` dead-letters the entry at once; any other
exception leaves it pending, to be delivered again (``reclaim.py``) until its ``max_deliveries``
th failure, when it is dead-lettered (``dead_letters.py``). An entry already delivered more than
``max_deliveries`` times (a handler that kills its process) is dead-lettered without running.

Redis errors make the loops back off (with jitter) and retry; ``NOGROUP`` (Redis lost the
stream) recreates the group. :meth:`stop` ends the blocked read at once (``CLIENT UNBLOCK``);
in-flight handlers finish (or are cancelled by the owner's deadline, and stay pending); nothing
is acked that was not processed.
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

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.reclaim import Reclaimer
from tokenbridge.exceptions import InvalidEntry
from tokenbridge.store.client import REDIS_DOWN_ERRORS, Backoff, is_busygroup, is_nogroup
from tokenbridge.text import as_text

__all__ = ["ConsumerOptions", "ConsumerStats", "Delivery", "Handler", "StreamConsumer"]

log = logging.getLogger(__name__)

Entries = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One entry handed to a handler; ``deliveries`` counts this one (1 = first delivery)."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def redelivered(self) -> bool:
        return self.deliveries > 1


Handler = Callable[[Delivery], Awaitable[None]]


@dataclass
class ConsumerStats:
    """Counters of one consumer (past participles, shared with metrics and status)."""

    read: int = 0
    acked: int = 0
    failed: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    trimmed: int = 0
    last_activity: float = 0.0


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """How one consumer reads: ``concurrency`` handlers at once, ``count`` entries per read,
    ``BLOCK block_ms``, reclaim after ``claim_idle_ms`` (checked every ``heartbeat_s``),
    dead-letter after ``max_deliveries``; ``burst``: return once nothing is left to read."""

    concurrency: int = 16
    block_ms: int = 5000
    count: int = 100
    claim_idle_ms: int = 30_000
    heartbeat_s: float = 5.0
    max_deliveries: int = 5
    burst: bool = False


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
        options: ConsumerOptions = ConsumerOptions(),
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.options = options
        self.concurrency = options.concurrency
        self.block_ms = options.block_ms
        self.count = options.count
        self.max_deliveries = options.max_deliveries
        self.dead_letters = dead_letters
        self.burst = options.burst
        self.stats = ConsumerStats()
        self.running = False
        self.reclaimer = Reclaimer(self, options.claim_idle_ms, options.heartbeat_s)
        self._make_client = make_blocking_client
        self._stopping = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slot_free = asyncio.Event()
        self._to_ack: list[str] = []
        self._ack_wanted = asyncio.Event()
        self._reader_client_id: int | None = None
        self._group: asyncio.TaskGroup | None = None

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<StreamConsumer {self.stream} {self.group}/{self.consumer} running={self.running} "
            f"read={s.read} acked={s.acked} failed={s.failed} reclaimed={s.reclaimed} "
            f"dead_lettered={s.dead_lettered} inflight={len(self._inflight)}>"
        )

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def inflight_ids(self) -> list[str]:
        return list(self._inflight)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop reading; :meth:`run` returns once in-flight handlers have finished."""
        self._stopping.set()
        self._slot_free.set()

    async def ensure_group(self) -> None:
        """Create the group at the start of the stream if missing (idempotent)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as exc:
            if not is_busygroup(exc):
                raise

    async def run(self) -> None:
        """Consume until :meth:`stop` (or, in burst mode, until nothing is left)."""
        self.running = True
        log.info(
            "consumer started stream=%s group=%s consumer=%s",
            self.stream,
            self.group,
            self.consumer,
        )
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                keeper = group.create_task(self.reclaimer.run())
                acker = group.create_task(self._ack_loop())
                unblocker = group.create_task(self._unblock_on_stop())
                await self._read_loop()
                while self._inflight:  # drain: handlers finish, their acks are flushed
                    await asyncio.wait(list(self._inflight.values()))
                keeper.cancel()
                unblocker.cancel()
                self._stopping.set()
                self._ack_wanted.set()
                await acker
            await self.reclaimer.forget_self()
        finally:
            self.running = False
            self._group = None
            log.info("consumer stopped %r", self)

    async def _read_loop(self) -> None:
        backoff = Backoff()
        client = self._make_client()
        pending_cursor: str | None = "0-0"  # own pending entries first
        try:
            await self._retrying(self.ensure_group)
            while not self._stopping.is_set():
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                    continue
                try:
                    if self._reader_client_id is None:
                        self._reader_client_id = await client.client_id()
                    entries = await self._read(client, pending_cursor, free)
                    backoff.reset()
                except REDIS_DOWN_ERRORS as exc:
                    self._reader_client_id = None  # a new connection gets a new id
                    delay = backoff.next()
                    log.warning(
                        "consumer %s lost redis (%s); retry in %.2fs", self.consumer, exc, delay
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
                if pending_cursor is not None:
                    if not entries:
                        pending_cursor = None
                        continue
                    pending_cursor = entries[-1][0].decode()
                    await self.dispatch(entries, redelivered=True)
                elif entries:
                    await self.dispatch(entries, redelivered=False)
                elif self.burst and await self._drained():
                    return
        finally:
            await client.aclose()

    async def _read(self, client: Redis, pending_cursor: str | None, free: int) -> Entries:
        reply: Any = await client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: pending_cursor or ">"},
            count=min(free, self.count),
            block=None if pending_cursor is not None else self.block_ms,
        )
        return reply[0][1] if reply else []

    async def _drained(self) -> bool:
        """Burst mode: nothing new, nothing in flight, nothing pending in the whole group."""
        if self._inflight or self._to_ack:
            return False
        summary: Any = await self.redis.xpending(self.stream, self.group)
        return int(summary["pending"]) == 0

    async def dispatch(self, entries: Entries, redelivered: bool) -> None:
        """Start a handler task per entry (counts of redeliveries come from XPENDING)."""
        assert self._group is not None
        counts = await self._delivery_counts(entries) if redelivered else {}
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
            delivery = Delivery(entry_id, fields, counts.get(entry_id, 1))
            task = self._group.create_task(self._handle(delivery))
            self._inflight[entry_id] = task

    async def _delivery_counts(self, entries: Entries) -> dict[str, int]:
        ids = [raw_id.decode() for raw_id, _ in entries]
        rows: Any = await self.redis.xpending_range(
            self.stream, self.group, ids[0], ids[-1], len(ids) + 100, consumername=self.consumer
        )
        return {as_text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def _handle(self, delivery: Delivery) -> None:
        try:
            if delivery.deliveries > self.max_deliveries and self.dead_letters is not None:
                await self._dead_letter(delivery, f"delivered {delivery.deliveries} times")
                return
            try:
                await self.handler(delivery)
            except asyncio.CancelledError:
                raise  # stays pending: another consumer (or our restart) takes it over
            except InvalidEntry as exc:
                self.stats.failed += 1
                if self.dead_letters is None:
                    log.warning("invalid entry acked entry_id=%s error=%s", delivery.entry_id, exc)
                    self._ack(delivery.entry_id)
                else:
                    await self._dead_letter(delivery, f"invalid entry: {exc}")
            except Exception as exc:
                self.stats.failed += 1
                if delivery.deliveries >= self.max_deliveries and self.dead_letters is not None:
                    await self._dead_letter(delivery, f"{type(exc).__name__}: {exc}")
                else:
                    log.warning(
                        "handler failed stream=%s group=%s entry_id=%s deliveries=%d error=%r",
                        self.stream,
                        self.group,
                        delivery.entry_id,
                        delivery.deliveries,
                        exc,
                    )
            else:
                self._ack(delivery.entry_id)
        except REDIS_DOWN_ERRORS as exc:  # dead-lettering failed: it stays pending
            log.warning("could not dead-letter entry_id=%s (%s)", delivery.entry_id, exc)
        finally:
            self._inflight.pop(delivery.entry_id, None)
            self.stats.last_activity = time.time()
            self._slot_free.set()
            self.reclaimer.slot_freed.set()

    async def _dead_letter(self, delivery: Delivery, error: str) -> None:
        assert self.dead_letters is not None
        await self.dead_letters.move(
            self.stream,
            self.group,
            delivery.entry_id,
            delivery.fields,
            error,
            delivery.deliveries,
            self.consumer,
        )
        self.stats.dead_lettered += 1

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
                    log.warning("xack failed for %d entries (%s); retrying", len(ids), exc)
                    self._to_ack[:0] = ids  # still pending in Redis until acked
                    await asyncio.sleep(backoff.next())
                    self._ack_wanted.set()
            if self._stopping.is_set() and not self._inflight and not self._to_ack:
                return

    async def _retrying(self, op: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                await op()
                return
            except REDIS_DOWN_ERRORS as exc:
                delay = backoff.next()
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                await self._sleep_unless_stopping(delay)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopping.wait()
