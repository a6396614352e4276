"""GenerationWorker: takes generation jobs from the job stream and runs them on the Producer.

It is a :class:`StreamConsumer` of the job stream's ``workers`` group, so each job runs on
one worker process, and the job of a worker that died is reclaimed by a live one. A reclaimed
job is recovered from the session's progress record (``tb:{session}:gens``):

* never started: it runs now, as if it had not been interrupted;
* finished: nothing to do (the ack was lost), it is acked;
* half done: the session stream gets an ``error`` event with code ``worker_lost`` right after
  the last event actually in the stream, so clients never wait for a generation that will not
  come (the sweeper's check-and-set script: exactly one terminal event, whoever comes first).

Before the model call, a job whose answer is in the response cache is replayed from it
instead (``processors/cache.py``), and the ``before_model`` hooks run (the rate limiter notes
who pays for the tokens).

Workers announce themselves in a sorted set (``tb:workers``, name -> heartbeat ms), which is
what ``/readyz`` and the status page read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from redis.asyncio import Redis

from tokenbridge.consumers.stream_consumer import ConsumerOptions, Delivery, StreamConsumer
from tokenbridge.consumers.stream_consumer_service import StreamConsumerService
from tokenbridge.producer.cancel import CancelSignal, cancel_requested
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.producer.models.base import ChatModel
from tokenbridge.producer.orphans import OrphanWatch
from tokenbridge.producer.producer import Producer
from tokenbridge.producer.sweeper import GenerationSweeper
from tokenbridge.store.client import REDIS_DOWN_ERRORS, Backoff
from tokenbridge.text import as_text
from tokenbridge.wire.events import Event, now_ms
from tokenbridge.wire.keys import WORKER_GROUP, Keys

__all__ = ["WORKER_GROUP", "GenerationWorker", "live_workers"]

log = logging.getLogger(__name__)

# the consumer group name lives in wire/keys.py with every other name


def _worker_name() -> str:
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{secrets.token_hex(3)}"


async def live_workers(redis: Redis, keys: Keys, within_ms: int) -> int:
    """How many workers sent a heartbeat in the last ``within_ms``."""
    count: int = await redis.zcount(keys.workers, now_ms() - within_ms, "+inf")
    return count


class GenerationWorker:
    """Runs generation jobs with bounded concurrency until stopped."""

    def __init__(
        self,
        redis: Redis,
        service: StreamConsumerService,
        keys: Keys,
        producer: Producer,
        models: dict[str, ChatModel],
        *,
        concurrency: int,
        block_ms: int,
        claim_idle_ms: int,
        heartbeat_s: float,
        max_deliveries: int = 5,
        orphan_grace_s: float = 0.0,
    ) -> None:
        self.redis = redis
        self.service = service
        self.keys = keys
        self.producer = producer
        self.models = models
        self.heartbeat_s = heartbeat_s
        self.name = _worker_name()
        self.generations_done = 0
        self.generations_abandoned = 0
        # Cancels, as abandoned, what no client reads (orphan_grace_s; 0: never).
        self.orphans: OrphanWatch | None = None
        if orphan_grace_s > 0:
            self.orphans = OrphanWatch(redis, keys, orphan_grace_s, heartbeat_s)
            producer.on_published = self.orphans.published
        self._options = ConsumerOptions(
            concurrency=concurrency,
            block_ms=block_ms,
            count=concurrency,
            claim_idle_ms=claim_idle_ms,
            heartbeat_s=heartbeat_s,
            max_deliveries=max_deliveries,
        )
        self.consumer: StreamConsumer | None = None
        # Set by Runtime: the response cache (processors/cache.py), and hooks run before a
        # model call (the rate limiter notes who pays for the tokens).
        self.cache: _Cache | None = None
        self.before_model: list[Callable[[GenerationJob], Awaitable[None]]] = []
        self.cached = 0
        self._stopping = asyncio.Event()
        self._running: dict[str, CancelSignal] = {}  # generation id -> its cancel signal
        self._sessions: dict[str, str] = {}  # generation id -> session id, while running
        # Generations whose producer failed on Redis: registered as due once Redis is back.
        self._unfinished: dict[str, str] = {}
        self._max_unfinished = 4 * concurrency
        self.sweeper = GenerationSweeper(
            redis,
            keys,
            deadline_s=2 * claim_idle_ms / 1000 + heartbeat_s,
            interval_s=heartbeat_s,
            retention_s=producer.retention_s,
            stream_max_len=producer.hard_max_len,
            pipeline_shards=producer.pipeline_shards,
            pipeline_max_len=producer.pipeline_max_len,
        )

    def __repr__(self) -> str:
        return (
            f"<GenerationWorker {self.name} done={self.generations_done} cached={self.cached} "
            f"abandoned={self.generations_abandoned} "
            f"{self.consumer!r}>"
        )

    def stop(self) -> None:
        """Stop taking jobs; running generations go on until they end (or are cancelled)."""
        self._stopping.set()
        if self.consumer is not None:
            self.consumer.stop()

    async def run(self) -> None:
        """Start the job consumer (in the service) and send heartbeats until stopped."""
        self.consumer = self.service.start_consumer(
            self.keys.jobs, WORKER_GROUP, self.name, self._handle, self._options
        )
        try:
            async with asyncio.TaskGroup() as group:
                helpers = [
                    group.create_task(self._heartbeat()),
                    group.create_task(self._listen_for_cancels()),
                    group.create_task(self.sweeper.run()),
                ]
                if self.orphans is not None:
                    helpers.append(group.create_task(self.orphans.run()))
                try:
                    await self._stopping.wait()
                finally:
                    for task in helpers:
                        task.cancel()
        finally:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.redis.zrem(self.keys.workers, self.name)

    async def _heartbeat(self) -> None:
        # Ends on the stop flag, not only on cancellation: on Python 3.11 a cancel that lands
        # while redis-py finishes a command can be lost, and the loop would run on forever.
        while not self._stopping.is_set():
            try:
                now = now_ms()
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(self.keys.workers, {self.name: now})
                    # Forget workers silent for a day; readiness looks at the last seconds.
                    pipe.zremrangebyscore(self.keys.workers, "-inf", now - 86_400_000)
                    await pipe.execute()
                await self._register_generations()
            except REDIS_DOWN_ERRORS as exc:
                log.debug("worker heartbeat failed (%s)", exc)
            with contextlib.suppress(TimeoutError):  # a timer: liveness is periodic by nature
                async with asyncio.timeout(self.heartbeat_s):
                    await self._stopping.wait()

    async def _register_generations(self) -> None:
        """Refresh the sweeper's deadlines of our running generations (re-adding them after
        Redis lost them), and hand it those whose producer failed on Redis."""
        await self.sweeper.register((sid, gid) for gid, sid in self._sessions.items())
        if self._unfinished:
            unfinished, self._unfinished = self._unfinished, {}
            try:
                await self.sweeper.register(
                    ((sid, gid) for gid, sid in unfinished.items()), due_now=True
                )
            except REDIS_DOWN_ERRORS:
                self._unfinished.update(unfinished)
                raise

    async def _listen_for_cancels(self) -> None:
        """Cancel notices (pub/sub) stop a running generation at once; missed ones are caught
        by the producer's flag check, so a reconnect gap here loses nothing."""
        backoff = Backoff()
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
                backoff.reset()
                async for message in pubsub.listen():
                    event = self._running.get(as_text(message.get("data")))
                    if event is not None:
                        event.cancel()
            except REDIS_DOWN_ERRORS as exc:
                log.debug("cancel listener: redis unavailable (%s)", exc)
                await asyncio.sleep(backoff.next())
            finally:
                with contextlib.suppress(*REDIS_DOWN_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _handle(self, delivery: Delivery) -> None:
        job = GenerationJob.from_fields(delivery.fields)  # InvalidEntry: dead-lettered
        if delivery.redelivered and await self._recovered(job):
            return
        gid = job.generation_id
        # Jobs written straight to the job stream have no lookup record yet: cancel needs it.
        await self.redis.set(
            self.keys.generation(gid),
            job.session_id,
            nx=True,
            ex=self.producer.max_generation_s + self.producer.retention_s,
        )
        if await cancel_requested(self.redis, self.keys, job.session_id, gid):
            await self.producer.write_events(
                job,
                Event("start", gid, 0, model=job.model),
                Event("end", gid, 1, reason="cancelled"),
            )
            return
        model = self.models.get(job.model)
        if model is None:
            await self.producer.write_events(
                job,
                Event("error", job.generation_id, 0, code="unknown_model", message=job.model),
            )
            return
        if self.cache is not None and await self.cache.replay(job, self.producer):
            self.cached += 1
            log.info(
                "generation answered from the cache session=%s generation=%s model=%s",
                job.session_id,
                gid,
                job.model,
            )
            return
        for hook in self.before_model:
            await hook(job)
        log.info(
            "generation started session=%s generation=%s model=%s worker=%s",
            job.session_id,
            job.generation_id,
            job.model,
            self.name,
        )
        cancel = self._running[gid] = CancelSignal()
        self._sessions[gid] = job.session_id
        if self.orphans is not None:
            self.orphans.watch(job, cancel)
        try:
            await self.sweeper.register([(job.session_id, gid)])
            result = await self.producer.run(job, model, cancel)
        except Exception as exc:
            redis_down = isinstance(exc, REDIS_DOWN_ERRORS) or (
                isinstance(exc, BaseExceptionGroup) and exc.subgroup(REDIS_DOWN_ERRORS)
            )  # the producer's TaskGroup wraps its writer's error
            if redis_down and len(self._unfinished) < self._max_unfinished:  # bounded
                self._unfinished[gid] = job.session_id
            raise
        finally:
            self._running.pop(gid, None)
            self._sessions.pop(gid, None)
            if self.orphans is not None:
                self.orphans.forget(gid)
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await self.sweeper.done(job.session_id, gid)
        self.generations_done += 1
        self.generations_abandoned += result.outcome == "abandoned"
        log.info(
            "generation finished generation=%s outcome=%s tokens=%d writes=%d duration_s=%.3f",
            result.generation_id,
            result.outcome,
            result.tokens,
            result.writes,
            result.duration_s,
        )

    async def _recovered(self, job: GenerationJob) -> bool:
        """Handle a job another worker left; True when there is nothing left to run."""
        record: Any = await self.redis.hget(
            self.keys.generations(job.session_id), job.generation_id
        )
        if record is None:
            return False
        if record.startswith(b"running"):
            # One check-and-set script with the sweeper's: right after the last event actually
            # in the stream, and never if someone (a sweeper, the producer) ended it meanwhile.
            seq = await self.sweeper.end_lost(
                job.session_id,
                job.generation_id,
                code="worker_lost",
                message="the worker running this generation stopped; start it again",
                model=job.model,
            )
            log.warning(
                "generation lost with its worker session=%s generation=%s seq=%d",
                job.session_id,
                job.generation_id,
                seq,
            )
        return True


class _Cache(Protocol):
    async def replay(self, job: GenerationJob, producer: Producer) -> bool:
        """Write the cached answer of ``job``; False if there is none."""
        ...
