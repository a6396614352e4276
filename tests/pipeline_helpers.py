"""Helpers of the pipeline tests, and processors a subprocess can load by dotted path
(``TOKENBRIDGE_PROCESSORS_EXTRA=tests.pipeline_helpers:Slow``)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence

from redis.asyncio import Redis

from tokenbridge.processors.registry import ProcessorContext
from tokenbridge.producer.jobs import GenerationJob, Message, submit_job
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.producer.producer import Producer
from tokenbridge.settings import Settings
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.events import Event, decode_entry
from tokenbridge.wire.keys import Keys
from tokenbridge.wire.pipeline import PipelineBatch


class AlwaysFails:
    """Raises on every entry."""

    name = "always_fails"

    def __init__(self, context: ProcessorContext) -> None:
        self.context = context

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        raise RuntimeError(f"always fails on {batch.once_key}")


class Slow:
    """Takes 20 ms per entry (it stands for real work), so a crash test can kill mid-way."""

    name = "slow"

    def __init__(self, context: ProcessorContext) -> None:
        self.context = context

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        await asyncio.sleep(0.02)


def demo_job(n: int, session_id: str, max_tokens: int, rate: float) -> GenerationJob:
    return GenerationJob(
        generation_id="g_" + secrets.token_hex(8),
        session_id=session_id,
        model="demo",
        messages=[Message(role="user", content=f"prompt number {n}")],
        params=GenerationParams(max_tokens=max_tokens, rate=rate),
    )


async def submit(redis: Redis, keys: Keys, jobs: Sequence[GenerationJob]) -> None:
    for job in jobs:
        await submit_job(redis, keys, job, max_len=100_000, lookup_ttl_s=3600)


async def own_token_counts(redis: Redis, keys: Keys, sessions: set[str]) -> dict[str, int]:
    """Each generation's own count, from its end event in the session stream."""
    counts: dict[str, int] = {}
    for session_id in sessions:
        for _, fields in await redis.xrange(keys.events(session_id)):
            event = decode_entry(fields)
            if event.kind == "end":
                usage = event.usage or {}
                counts[event.generation_id] = usage.get("completion_tokens", event.tokens)
    return counts


def producer(redis: Redis, keys: Keys, settings: Settings) -> Producer:
    return Producer(
        redis,
        Scripts(redis),
        keys,
        stream_max_len=settings.stream_max_len,
        retention_s=settings.stream_retention_s,
        max_generation_s=settings.stream_max_generation_s,
        max_pending=settings.producer_max_pending,
        pipeline_shards=settings.pipeline_shards,
        pipeline_max_len=settings.pipeline_max_len,
    )


async def pipeline_entries(redis: Redis, keys: Keys, shards: int) -> list[PipelineBatch]:
    batches = []
    for shard in range(shards):
        for _, fields in await redis.xrange(keys.pipeline(shard)):
            batches.append(PipelineBatch.from_fields(fields, shard))
    return batches


def events_of(gid: str, n: int, end: Event) -> list[Event]:
    events = [Event("start", gid, 0, ts=1000, model="m1")]
    events += [Event("token", gid, i, ts=1000 + 10 * i, text=f" w{i}") for i in range(1, n + 1)]
    return [*events, end]


def batches_of(session_id: str, events: list[Event], size: int) -> list[PipelineBatch]:
    return [
        PipelineBatch(session_id, events[0].generation_id, "m1", tuple(events[i : i + size]),
                      prompt_sha256="ab" * 32 if i == 0 else "")
        for i in range(0, len(events), size)
    ]  # fmt: skip


class Stalled:
    """Holds every entry until :attr:`gate` is set (processors stalled); records what it saw.

    Class-level state: the test that loads it (``tests.pipeline_helpers:Stalled``) resets it.
    """

    name = "stalled"
    gate = asyncio.Event()
    seen: set[str] = set()
    target = 0
    reached = asyncio.Event()

    def __init__(self, context: ProcessorContext) -> None:
        self.context = context

    @classmethod
    def reset(cls) -> None:
        cls.gate, cls.reached, cls.seen, cls.target = asyncio.Event(), asyncio.Event(), set(), 0

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        await type(self).gate.wait()
        type(self).seen.add(batch.once_key)
        if type(self).target and len(type(self).seen) >= type(self).target:
            type(self).reached.set()
