"""Producer: runs one generation and appends its events to the session stream.

The model's tokens go into a bounded queue; one writer task drains whatever is queued and
writes it with one pipelined round trip (XADD ... MAXLEN ~ per event, plus the generation's
progress record). While a round trip is in flight the next tokens queue up, so the batch size
follows the speed of the model relative to Redis: one event per write for a slow model, hundreds
for a fast one. A full queue makes the model wait (backpressure) instead of growing memory.

Every generation ends with exactly one terminal event: ``end`` (stop, length, cancelled) or
``error`` (with a code). Then the session's keys get their retention TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from redis.asyncio import Redis

from tokenbridge.exceptions import ModelError
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.producer.models.base import ChatModel, Delta, Finish
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.events import Event
from tokenbridge.wire.keys import Keys

__all__ = ["GenerationResult", "Producer"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GenerationResult:
    """How a generation ended, with its figures."""

    generation_id: str
    outcome: str  # stop | length | cancelled | error:<code>
    tokens: int
    writes: int
    first_token_s: float | None
    duration_s: float


class _Writer:
    """Batches a generation's events into pipelined XADD round trips."""

    def __init__(self, producer: Producer, job: GenerationJob, max_pending: int) -> None:
        self.producer = producer
        self.job = job
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=max_pending)
        self.writes = 0

    async def run(self) -> None:
        """Write until a terminal event is written."""
        p = self.producer
        events_key = p.keys.events(self.job.session_id)
        gens_key = p.keys.generations(self.job.session_id)
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < 4096:
                batch.append(self.queue.get_nowait())
            last = batch[-1]
            terminal = last.kind in ("end", "error")
            async with p.redis.pipeline(transaction=False) as pipe:
                for event in batch:
                    pipe.xadd(
                        events_key,
                        event.to_fields(),  # type: ignore[arg-type]
                        maxlen=p.stream_max_len,
                        approximate=True,
                    )
                state = "done" if terminal else "running"
                pipe.hset(gens_key, self.job.generation_id, f"{state} {last.seq}")
                if terminal:
                    for key in (events_key, gens_key, p.keys.meta(self.job.session_id)):
                        pipe.expire(key, p.retention_s)
                await pipe.execute()
            self.writes += 1
            if terminal:
                return


class Producer:
    """Runs generations: model tokens in, batched session-stream writes out."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        stream_max_len: int,
        retention_s: int,
        max_generation_s: int,
        max_pending: int,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.stream_max_len = stream_max_len
        self.retention_s = retention_s
        self.max_generation_s = max_generation_s
        self.max_pending = max_pending

    async def prepare(self, session_id: str) -> None:
        """Make sure the session has an epoch, and bound its keys' life while generating."""
        ttl_ms = self.max_generation_s * 1000
        await self.scripts.session_state(
            self.keys.meta(session_id),
            self.keys.events(session_id),
            new_epoch=secrets.token_hex(4),
            orphan_ttl_ms=ttl_ms,
            extend_ttl_ms=ttl_ms,
        )
        await self.redis.expire(self.keys.generations(session_id), self.max_generation_s)

    async def write_terminal(self, job: GenerationJob, event: Event) -> None:
        """Write a lone terminal event for ``job`` (a job that cannot run, or a lost worker)."""
        await self.prepare(job.session_id)
        writer = _Writer(self, job, 1)
        writer.queue.put_nowait(event)
        await writer.run()

    async def run(self, job: GenerationJob, model: ChatModel) -> GenerationResult:
        """Run ``job`` on ``model`` to its terminal event.

        A model error becomes an ``error`` event; cancellation writes ``end`` (reason
        ``cancelled``, shielded) before re-raising. Redis errors propagate.
        """
        await self.prepare(job.session_id)
        writer = _Writer(self, job, self.max_pending)
        started = time.monotonic()
        first_token_s: list[float] = []
        outcome = "error"
        tokens = 0
        async with asyncio.TaskGroup() as group:
            write_task = group.create_task(writer.run())
            seq = 0
            try:
                await writer.queue.put(Event("start", job.generation_id, 0, model=job.model))
                items = _with_first(model, job, first_token_s, started)
                async with contextlib.aclosing(items):
                    async for item in items:
                        seq += 1
                        if isinstance(item, Delta):
                            await writer.queue.put(
                                Event("token", job.generation_id, seq, text=item.text)
                            )
                            tokens += 1
                        else:
                            outcome = item.reason
                            await writer.queue.put(
                                Event(
                                    "end",
                                    job.generation_id,
                                    seq,
                                    reason=item.reason,
                                    tokens=tokens,
                                    usage=item.usage,
                                )
                            )
                            break
                    else:
                        seq += 1
                        outcome = "stop"
                        await writer.queue.put(
                            Event("end", job.generation_id, seq, reason="stop", tokens=tokens)
                        )
            except ModelError as exc:
                outcome = f"error:{exc.code}"
                log.info("generation failed generation=%s code=%s", job.generation_id, exc.code)
                await writer.queue.put(
                    Event(
                        "error", job.generation_id, seq + 1, code=exc.code, message=str(exc)[:1000]
                    )
                )
            except asyncio.CancelledError:
                outcome = "cancelled"
                end = Event("end", job.generation_id, seq + 1, reason="cancelled", tokens=tokens)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):  # bounded: the writer drains the queue
                        await writer.queue.put(end)
                        await asyncio.shield(write_task)
                raise
        return GenerationResult(
            job.generation_id,
            outcome,
            tokens,
            writer.writes,
            first_token_s[0] if first_token_s else None,
            time.monotonic() - started,
        )


async def _with_first(
    model: ChatModel, job: GenerationJob, first: list[float], started: float
) -> AsyncGenerator[Delta | Finish, None]:
    """The model's stream, noting when the first token arrived; always closes the stream."""
    async with contextlib.aclosing(model.stream(job.chat_request())) as stream:
        async for item in stream:
            if not first and isinstance(item, Delta):
                first.append(time.monotonic() - started)
            yield item
