"""Pipeline trimming: never below what the processors group still needs; the cap counts its
drops as lost, never as lag (issue 16, item 3)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.pipeline_helpers import Stalled, demo_job
from tests.servers import Gateway
from tokenbridge.processors.pipeline_trim import PipelineTrimmer
from tokenbridge.producer.models.demo import DemoModel
from tokenbridge.settings import Settings
from tokenbridge.store.stats import read_pipeline_status
from tokenbridge.wire.keys import Keys

GROUP = "processors"


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url_value() or "")
    async with client:
        yield client


async def _add(redis: Redis, key: str, n: int) -> list[bytes]:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(key, {"n": i})
        ids: list[bytes] = await pipe.execute()
    return ids


async def _read(redis: Redis, key: str, n: int) -> list[bytes]:
    reply: Any = await redis.xreadgroup(GROUP, "c1", {key: ">"}, count=n)
    return [entry_id for entry_id, _ in reply[0][1]] if reply else []


async def _lag(redis: Redis, key: str) -> int:
    groups: Any = await redis.xinfo_groups(key)
    return int(groups[0]["lag"])


async def test_trim_keeps_pending_and_undelivered_and_counts_cap_drops(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    key = keys.pipeline(0)
    trimmer = PipelineTrimmer(redis, keys, GROUP, shards=1, max_len=500, interval_s=60)
    await redis.xgroup_create(key, GROUP, id="0", mkstream=True)
    await _add(redis, key, 300)
    delivered = await _read(redis, key, 100)
    await redis.xack(key, GROUP, *delivered[:40])

    first = await trimmer.trim(0)  # acked below the oldest pending: dropped, nothing lost
    assert (first.safe, first.lost) == (40, 0)
    assert await redis.xlen(key) == 260 and await _lag(redis, key) == 200

    await redis.xack(key, GROUP, *delivered[40:])
    await _add(redis, key, 500)  # the processors stall: 700 undelivered, cap 500
    second = await trimmer.trim(0)
    assert (second.safe, second.capped) == (60, 200)
    assert (second.lost_undelivered, second.lost_pending) == (200, 0)
    assert await redis.xlen(key) == 500
    assert await _lag(redis, key) == 500  # only what really waits, not the loss

    held = await _read(redis, key, 100)  # delivered, not acked: pending at the head
    await _add(redis, key, 500)
    third = await trimmer.trim(0)
    assert (third.lost_pending, third.lost_undelivered) == (100, 400)
    assert await _lag(redis, key) == 500
    summary: Any = await redis.xpending(key, GROUP)
    assert summary["pending"] == 0  # the dropped pending entries are no longer pending
    assert held[-1] < third.kept_from.encode()

    rest = await _read(redis, key, 1000)
    await redis.xack(key, GROUP, *rest)
    assert await _lag(redis, key) == 0
    await trimmer.trim(0)
    assert await redis.xlen(key) == 0
    [row] = await read_pipeline_status(redis, keys, 1)
    assert (row["lost"], row["lag"], row["pending"]) == (700, 0, 0)
    assert trimmer.lost == 700


async def test_stalled_processors_past_the_cap_lose_nothing_uncounted(
    settings_factory: Any, redis: Redis
) -> None:
    settings = settings_factory(
        pipeline_shards=1,
        pipeline_max_len=100,
        processors=["analytics"],
        processors_extra=["tests.pipeline_helpers:Stalled"],
        processors_concurrency=4,
    )
    keys = Keys(settings.key_prefix)
    key = keys.pipeline(0)
    Stalled.reset()
    async with Gateway(settings, worker=False) as gw:
        runtime = gw.runtime
        for wave in range(10):
            jobs = [demo_job(wave * 30 + i, f"s_stall{i}", 3, 0) for i in range(30)]
            await asyncio.gather(*(runtime.producer.run(job, DemoModel()) for job in jobs))
            await runtime.processor.trimmer.trim_all()  # as its periodic task does
        info: Any = await redis.xinfo_stream(key)
        added = int(info["entries-added"])
        lost = int((await redis.hget(keys.pipeline_lost, "0")) or 0)
        assert added >= 300 and lost >= added - 100 - 4  # the cap dropped, and counted it
        assert await _lag(redis, key) == await redis.xlen(key)  # what waits, not the loss
        Stalled.target = added - lost
        Stalled.gate.set()
        async with asyncio.timeout(30):
            await Stalled.reached.wait()
    # Stopped (drained and acked): every entry was processed or counted as lost.
    await PipelineTrimmer(redis, keys, GROUP, shards=1, max_len=100, interval_s=60).trim_all()
    assert len(Stalled.seen) + lost >= added
    assert await _lag(redis, key) == 0
    summary: Any = await redis.xpending(key, GROUP)
    assert summary["pending"] == 0


async def test_entries_someone_else_trimmed_are_counted_and_leave_the_lag(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    key = keys.pipeline(0)
    await redis.xgroup_create(key, GROUP, id="0", mkstream=True)
    for n in range(100):  # as the producer's backstop MAXLEN does, with nobody reading
        await redis.xadd(key, {"n": n}, maxlen=30, approximate=False)
    # (Redis's own lag estimate hides them here: nothing was ever read, so none was delivered.)
    result = await PipelineTrimmer(redis, keys, GROUP, 1, max_len=1000, interval_s=60).trim(0)
    assert (result.lost_undelivered, result.capped) == (70, 0)
    assert await _lag(redis, key) == 30  # only what really waits
    assert await redis.hget(keys.pipeline_lost, "0") == b"70"
