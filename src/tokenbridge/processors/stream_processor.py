"""StreamProcessor: runs every registered processor on every pipeline entry, each in isolation.

The producer appends one entry per flushed batch to the pipeline streams
(``<prefix>:pipeline:<n>``, ``wire/pipeline.py``). A StreamProcessor runs one
:class:`~tokenbridge.consumers.stream_consumer.StreamConsumer` per shard in the consumer group
``processors`` (through the process's StreamConsumerService), so the processes that run one
split the entries between them, and the entries of a crashed one are reclaimed by another.

Entries in flight are handed to the processors in groups (``processors/batcher.py``): what
the handlers submitted while the previous group was being processed, at most 256. The
processors run one after the other on a group, in the order of the settings. A processor with
an ``async def process_many(items) -> list[Exception | None]`` gets the whole group in one
call (the built-in analytics and logging send a group's scripts in one round trip: about
half the CPU per entry); the others get ``process`` once per entry, concurrently. Per entry
and per processor, in isolation:

* a processor that returns has processed the entry (``processed``, ``time_spent_s``);
* a processor that raises is counted (``failed``, ``last_error``), logged (WARNING, at most
  one line per processor per 10 s), and, with ``processors_dead_letter``, the entry is copied
  to the dead-letter stream for it (group ``processors``, the error names the processor).
  The other processors' work stands and the entry is acked: one broken processor never
  stalls the pipeline. ``tokenbridge dlq replay`` puts the entry back, and every processor
  runs on it again;
* if a processor fails because Redis is unreachable, the entry is not acked: it is delivered
  again later (to this or another process) and every processor runs on it again.

So delivery is at least once, per processor: a processor must make its effects idempotent. Key
them on :attr:`PipelineBatch.once_key` (``<generation_id>:<first seq>``), which is the same on
every delivery and on a replay from the dead letters, where the entry id is not.

Stats (per processor: processed, failed, dead_lettered, time spent, last error) are kept in
memory and published to Redis (``<prefix>:processors``, one field per process) every
heartbeat, so every gateway and ``tokenbridge stats`` show those of all processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

from redis.asyncio import Redis

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer import ConsumerOptions, Delivery, StreamConsumer
from tokenbridge.consumers.stream_consumer_service import StreamConsumerService
from tokenbridge.processors.base import Processor
from tokenbridge.processors.batcher import Batcher
from tokenbridge.processors.pipeline_trim import PipelineTrimmer
from tokenbridge.processors.registry import ProcessorContext, load_processors
from tokenbridge.settings import Settings
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import PROCESSOR_GROUP, Keys
from tokenbridge.wire.pipeline import PipelineBatch

__all__ = [
    "PROCESSOR_GROUP",
    "Processor",
    "ProcessorStats",
    "StreamProcessor",
]

log = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0
_MAX_GROUP = 256  # entries handed to the processors at once
_Item = tuple[PipelineBatch, str]  # an entry: its batch and its entry id
_FORGET_AFTER_MS = 86_400_000  # published stats of a process silent for a day are dropped


@dataclass
class ProcessorStats:
    """Counters of one processor in one process (past participles, as in ConsumerStats)."""

    processed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    time_spent_s: float = 0.0
    last_error: str = ""
    last_error_ms: int = 0
    last_error_entry: str = ""


async def _call(processor: Processor, batch: PipelineBatch, entry_id: str) -> Exception | None:
    try:
        await processor.process(batch, entry_id)
    except Exception as exc:  # isolation: one processor's error is its own
        return exc
    return None


def _process_name() -> str:
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{secrets.token_hex(3)}"


class StreamProcessor:
    """Runs ``processors`` on every entry of every pipeline shard until stopped.

    An entry is acked once every processor has processed it or failed on it (a failure is
    counted, logged and dead-lettered for that processor alone); it stays pending, to be
    delivered again, when Redis was unreachable or when the process stops (or is cancelled)
    before its processors are done.
    """

    def __init__(
        self,
        redis: Redis,
        service: StreamConsumerService,
        keys: Keys,
        processors: Sequence[Processor],
        *,
        shards: int,
        concurrency: int = 16,
        block_ms: int = 5000,
        claim_idle_ms: int = 30_000,
        heartbeat_s: float = 5.0,
        max_deliveries: int = 5,
        dead_letters: DeadLetters | None = None,
        dead_letter_failures: bool = True,
        max_len: int = 100_000,
    ) -> None:
        self.redis = redis
        self.service = service
        self.keys = keys
        self.processors = list(processors)
        self.shards = shards
        self.heartbeat_s = heartbeat_s
        self.dead_letters = dead_letters
        self.dead_letter_failures = dead_letter_failures
        self.name = _process_name()
        self.stats = {p.name: ProcessorStats() for p in self.processors}
        self.consumers: list[StreamConsumer] = []
        self.trimmer = PipelineTrimmer(redis, keys, PROCESSOR_GROUP, shards, max_len, heartbeat_s)
        self._options = ConsumerOptions(
            concurrency=concurrency,
            count=concurrency,
            block_ms=block_ms,
            claim_idle_ms=claim_idle_ms,
            heartbeat_s=heartbeat_s,
            max_deliveries=max_deliveries,
        )
        self._stopping = asyncio.Event()
        self._batcher = Batcher(self._run_group, max_items=_MAX_GROUP)
        self._logged: dict[str, tuple[float, int]] = {}  # name -> (last log time, failures then)

    @classmethod
    def from_settings(
        cls,
        redis: Redis,
        service: StreamConsumerService,
        keys: Keys,
        settings: Settings,
        dead_letters: DeadLetters | None = None,
    ) -> StreamProcessor:
        """The processors ``settings`` switch on, with the settings' bounds."""
        return cls(
            redis,
            service,
            keys,
            load_processors(ProcessorContext(redis, keys, settings)),
            shards=settings.pipeline_shards,
            concurrency=settings.processors_concurrency,
            block_ms=settings.consumer_block_ms,
            claim_idle_ms=settings.consumer_claim_idle_ms,
            heartbeat_s=settings.consumer_heartbeat_s,
            max_deliveries=settings.consumer_max_deliveries,
            dead_letters=dead_letters,
            dead_letter_failures=settings.processors_dead_letter,
            max_len=settings.pipeline_max_len,
        )

    def __repr__(self) -> str:
        figures = " ".join(
            f"{name}={s.processed}/{s.failed}" for name, s in self.stats.items()
        )  # processed/failed
        return f"<StreamProcessor {self.name} shards={self.shards} {figures}>"

    def stop(self) -> None:
        """Stop reading; in-flight entries finish (the service drains its consumers)."""
        self._stopping.set()
        self.trimmer.stop()
        for consumer in self.consumers:
            consumer.stop()

    async def run(self, burst: bool = False) -> None:
        """Consume every shard until :meth:`stop` (``burst``: until nothing is left)."""
        names = ", ".join(p.name for p in self.processors) or "none"
        log.info("stream processor started name=%s processors=%s", self.name, names)
        self.consumers = [
            self.service.start_consumer(
                self.keys.pipeline(shard),
                PROCESSOR_GROUP,
                self.name,
                partial(self._handle, shard),
                replace(self._options, burst=burst),
            )
            for shard in range(self.shards)
        ]
        try:
            async with asyncio.TaskGroup() as group:
                batcher = group.create_task(self._batcher.run())
                if not burst:
                    trimmer = group.create_task(self.trimmer.run())
                    await self._publish_until_stopped()
                    self.trimmer.stop()
                    await trimmer
                for c in self.consumers:  # drained (bounded by the service's drain_s)
                    await self.service.wait_consumer(c.stream, c.group, c.consumer)
                batcher.cancel()  # no handler is left to submit
        finally:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.publish()
            log.info("stream processor stopped %r", self)

    async def aclose(self) -> None:
        """Close the processors that have an ``aclose`` (after the consumers drained)."""
        for processor in self.processors:
            close = getattr(processor, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("processor aclose failed name=%s", processor.name)

    async def _handle(self, shard: int, delivery: Delivery) -> None:
        # InvalidEntry propagates: the consumer dead-letters the entry at once.
        batch = PipelineBatch.from_fields(delivery.fields, shard)
        outcomes = await self._batcher.submit((batch, delivery.entry_id))
        failures = [(p, exc) for p, exc in zip(self.processors, outcomes, strict=True) if exc]
        if not failures:
            return
        for _, exc in failures:
            if isinstance(exc, REDIS_DOWN_ERRORS):
                raise exc  # left pending: delivered again, every processor runs again
        if self.dead_letter_failures and self.dead_letters is not None:
            for processor, exc in failures:
                await self.dead_letters.move(
                    self.keys.pipeline(shard),
                    PROCESSOR_GROUP,
                    delivery.entry_id,
                    delivery.fields,
                    f"processor {processor.name}: {type(exc).__name__}: {exc}",
                    delivery.deliveries,
                    self.name,
                )
                self.stats[processor.name].dead_lettered += 1

    async def _run_group(self, items: list[_Item]) -> list[list[Exception | None]]:
        """Every processor on a group of entries; per entry, each processor's error or None."""
        columns = [await self._run_processor(p, items) for p in self.processors]
        return [list(row) for row in zip(*columns, strict=True)] if columns else [[]] * len(items)

    async def _run_processor(
        self, processor: Processor, items: list[_Item]
    ) -> list[Exception | None]:
        stats = self.stats[processor.name]
        started = time.perf_counter()
        many = getattr(processor, "process_many", None)
        try:
            if many is not None:
                try:
                    outcomes: list[Exception | None] = list(await many(items))
                except Exception as exc:  # the whole group failed for this processor
                    outcomes = [exc] * len(items)
            elif len(items) == 1:
                outcomes = [await _call(processor, *items[0])]
            else:
                outcomes = list(await asyncio.gather(*(_call(processor, *i) for i in items)))
        finally:
            stats.time_spent_s += time.perf_counter() - started
        for (batch, entry_id), error in zip(items, outcomes, strict=True):
            if error is None:
                stats.processed += 1
                continue
            stats.failed += 1
            stats.last_error = f"{type(error).__name__}: {error}"[:500]
            stats.last_error_ms = now_ms()
            stats.last_error_entry = f"{self.keys.pipeline(batch.shard)}/{entry_id}"
            self._log_failure(processor.name, entry_id, batch, error)
        return outcomes

    def _log_failure(self, name: str, entry_id: str, batch: PipelineBatch, exc: Exception) -> None:
        """One WARNING per processor per 10 s (with the count since): a processor failing on
        every entry must not flood the log."""
        now = time.monotonic()
        failed = self.stats[name].failed
        last_at, failed_then = self._logged.get(name, (-_LOG_EVERY_S, 0))
        if now - last_at < _LOG_EVERY_S:
            return
        self._logged[name] = (now, failed)
        log.warning(
            "processor failed processor=%s entry_id=%s session=%s generation=%s "
            "failures_since_last_log=%d error=%r",
            name,
            entry_id,
            batch.session_id,
            batch.generation_id,
            failed - failed_then,
            exc,
            exc_info=exc if log.isEnabledFor(logging.DEBUG) else None,
        )

    def status(self) -> dict[str, Any]:
        """This process's figures: per processor, and its consumers' entry counts."""
        entries: dict[str, int] = {}
        for consumer in self.consumers:
            for key, value in vars(consumer.stats).items():
                if key != "last_activity":
                    entries[key] = entries.get(key, 0) + int(value)
        return {
            "name": self.name,
            "running": any(c.running for c in self.consumers),
            "shards": self.shards,
            "updated_ms": now_ms(),
            "entries": entries,
            "groups": self._batcher.groups,  # entries / groups: how many shared a round trip
            "pipeline": {"trimmed": self.trimmer.trimmed, "lost": self.trimmer.lost},
            "processors": {name: asdict(s) for name, s in self.stats.items()},
        }

    async def publish(self) -> None:
        """Write :meth:`status` to ``<prefix>:processors`` (and forget long-silent processes)."""
        status = self.status()
        await self.redis.hset(self.keys.processor_stats, self.name, json.dumps(status))

    async def _publish_until_stopped(self) -> None:
        beats = 0
        while not self._stopping.is_set():
            try:
                await self.publish()
                beats += 1
                if beats % 100 == 1:
                    await _forget_silent(self.redis, self.keys)
            except REDIS_DOWN_ERRORS as exc:
                log.debug("processor stats not published (%s)", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):  # a timer, stopped by stop()
                    await self._stopping.wait()


async def _forget_silent(redis: Redis, keys: Keys) -> None:
    raw: Any = await redis.hgetall(keys.processor_stats)
    cutoff = now_ms() - _FORGET_AFTER_MS
    stale = [name for name, value in raw.items() if _updated(value) < cutoff]
    if stale:
        await redis.hdel(keys.processor_stats, *stale)


def _updated(value: bytes) -> int:
    try:
        return int(json.loads(value).get("updated_ms", 0))
    except (ValueError, AttributeError, TypeError):
        return 0
