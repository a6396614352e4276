"""A generation ended as lost (``worker_lost``, ``generation_lost``) reaches the processors:
one pipeline entry with the events its producer had not added yet and the terminal ``error``,
added once whoever ends it and however often it is retried (``producer/sweeper.py``,
``store/pipeline_add.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import BOTH
from tests.pipeline_helpers import pipeline_entries
from tests.servers import redis_client
from tokenbridge.processors.analytics import AnalyticsProcessor
from tokenbridge.processors.generation_log import LoggingProcessor, read_log
from tokenbridge.producer.sweeper import LOST_CODE, GenerationSweeper
from tokenbridge.settings import Settings
from tokenbridge.store.pipeline_add import PIPELINE_ADD_SCRIPT
from tokenbridge.store.stats import read_stats
from tokenbridge.wire.events import Event
from tokenbridge.wire.keys import Keys
from tokenbridge.wire.pipeline import PipelineHeader, events_json

pytestmark = BOTH


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    async with redis_client(settings.redis_url_value()) as client:
        yield client


def sweeper(redis: Redis, keys: Keys, settings: Settings, shards: bool = True) -> GenerationSweeper:
    return GenerationSweeper(
        redis, keys, deadline_s=60, interval_s=60, retention_s=60, stream_max_len=1000,
        pipeline_shards=settings.pipeline_shards if shards else 0,
    )  # fmt: skip


async def pipe(redis: Redis, keys: Keys, header: PipelineHeader, events: list[Event]) -> int:
    """Add a producer's batch through its script, as the producer does (1: added)."""
    marker = keys.pipeline_written(header.key, header.generation_id)
    fields = [v for pair in [*header.fields(), (b"events", events_json(events))] for v in pair]
    first, last = events[0].seq, events[-1].seq
    script: Any = redis.eval(
        PIPELINE_ADD_SCRIPT, 2, header.key, marker, first, last, 60, 1000, *fields
    )
    return int(await script)


async def written(redis: Redis, keys: Keys, settings: Settings, sid: str, gid: str, n: int,
                  piped: int) -> PipelineHeader:  # fmt: skip
    """A producer that died mid-answer: events 0..n-1 in the stream (start, then tokens), the
    first ``piped`` of them in a pipeline entry, the rest still gathering for the next one."""
    events = [Event("start", gid, 0, ts=1000, model="demo")]
    events += [Event("token", gid, i, ts=1000 + 10 * i, text=f" w{i}") for i in range(1, n)]
    for event in events:
        await redis.xadd(keys.events(sid), event.to_fields())  # type: ignore[arg-type]
    await redis.hset(keys.generations(sid), gid, f"running {n - 1}")
    header = PipelineHeader.of(keys, sid, gid, "demo", "ab" * 32, settings.pipeline_shards)
    if piped:
        assert await pipe(redis, keys, header, events[:piped]) == 1
    return header


async def counted(redis: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """Every pipeline entry through analytics and the generation log, twice (a redelivery)."""
    processors = [
        AnalyticsProcessor(redis, keys, settings),
        LoggingProcessor(redis, keys, settings),
    ]
    batches = await pipeline_entries(redis, keys, settings.pipeline_shards)
    for i, batch in enumerate([*batches, *batches]):
        for processor in processors:
            await processor.process(batch, f"{i}-0")
    total: dict[str, Any] = (await read_stats(redis, keys))["total"]
    return total


async def terminals(redis: Redis, keys: Keys, settings: Settings, gid: str) -> list[Event]:
    batches = await pipeline_entries(redis, keys, settings.pipeline_shards)
    return [b.terminal for b in batches if b.generation_id == gid and b.terminal is not None]


async def test_worker_lost_reaches_the_processors_once(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.key_prefix)
    sid, gid = "s_wl", "g_wl"
    header = await written(redis, keys, settings, sid, gid, n=10, piped=5)
    reclaiming = sweeper(redis, keys, settings)
    seq = await reclaiming.end_lost(sid, gid, code="worker_lost", message="gone", model="demo")
    assert seq == 10
    # A retry, a second sweeper, the sweeper after the reclaiming worker: nothing more.
    assert await reclaiming.end_lost(sid, gid, code="worker_lost", model="demo") == -1
    assert await sweeper(redis, keys, settings).end_lost(sid, gid) == -1
    assert not await reclaiming.add_to_pipeline(sid, gid, seq)
    # The producer, alive after all, retries its last batch: refused here as by the append.
    late = [Event("token", gid, 10, ts=2000, text=" late"), Event("end", gid, 11, reason="stop")]
    assert await pipe(redis, keys, header, late) == 0
    [terminal] = await terminals(redis, keys, settings, gid)
    assert (terminal.kind, terminal.code, terminal.seq) == ("error", "worker_lost", 10)
    batches = await pipeline_entries(redis, keys, settings.pipeline_shards)
    assert [(b.first_seq, b.last_seq) for b in batches] == [(0, 4), (5, 10)]
    assert batches[1].model == "demo"
    total = await counted(redis, keys, settings)
    assert (total["generations"], total["errors_by_code"]) == (1, {"worker_lost": 1})
    assert total["tokens"] == 9
    [record] = await read_log(redis, keys)
    assert (record["outcome"], record["error_code"]) == ("error", "worker_lost")
    assert record["text"] == "".join(f" w{i}" for i in range(1, 10))


async def test_generation_lost_before_any_pipeline_entry(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.key_prefix)
    sid, gid = "s_gl", "g_gl"
    await written(redis, keys, settings, sid, gid, n=4, piped=0)  # died before its first flush
    first, second = sweeper(redis, keys, settings), sweeper(redis, keys, settings)
    await first.register([(sid, gid)], due_now=True)
    assert await first.sweep() + await second.sweep() == 1
    [terminal] = await terminals(redis, keys, settings, gid)
    assert (terminal.code, terminal.seq) == (LOST_CODE, 4)
    total = await counted(redis, keys, settings)
    assert (total["generations"], total["errors_by_code"]) == (1, {LOST_CODE: 1})
    assert (await read_stats(redis, keys))["models"].keys() == {"demo"}  # from its start event


async def test_a_retry_after_a_lost_reply_adds_the_entry_once(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    sid, gid = "s_retry", "g_retry"
    await written(redis, keys, settings, sid, gid, n=6, piped=3)
    # The check-and-set won, the reply was lost before the pipeline entry was added:
    assert await sweeper(redis, keys, settings, shards=False).end_lost(sid, gid) == 6
    assert await terminals(redis, keys, settings, gid) == []
    again = sweeper(redis, keys, settings)
    assert await again.end_lost(sid, gid) == -1  # ended already: not written twice ...
    assert await again.end_lost(sid, gid) == -1
    [terminal] = await terminals(redis, keys, settings, gid)  # ... its entry added once
    assert (terminal.code, terminal.seq) == (LOST_CODE, 6)
    # A generation that ended normally gets no lost entry from a late sweeper.
    done_sid, done_gid = "s_fine", "g_fine"
    await redis.xadd(keys.events(done_sid), Event("end", done_gid, 0, reason="stop").to_fields())  # type: ignore[arg-type]
    await redis.hset(keys.generations(done_sid), done_gid, "done 0")
    assert await again.end_lost(done_sid, done_gid) == -1
    assert await terminals(redis, keys, settings, done_gid) == []
    total = await counted(redis, keys, settings)
    assert (total["generations"], total["errors_by_code"]) == (1, {LOST_CODE: 1})


async def test_a_producer_end_added_in_between_stays_the_only_one(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    sid, gid = "s_race", "g_race"
    header = await written(redis, keys, settings, sid, gid, n=4, piped=4)
    assert await sweeper(redis, keys, settings, shards=False).end_lost(sid, gid) == 4
    # The producer's terminal batch reaches the pipeline before the lost entry does (its
    # append is then answered as written: the record is `done 4` either way).
    assert await pipe(redis, keys, header, [Event("end", gid, 4, ts=1100, reason="stop")]) == 1
    assert await sweeper(redis, keys, settings).end_lost(sid, gid) == -1
    [terminal] = await terminals(redis, keys, settings, gid)
    assert (terminal.kind, terminal.seq) == ("end", 4)
    total = await counted(redis, keys, settings)
    assert total["generations"] == 1
