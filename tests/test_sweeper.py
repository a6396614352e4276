"""Every generation ends (issue 16, item 2): a generation whose producer is gone gets one
``error generation_lost``, written by whichever sweeper comes first, never twice."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.servers import Gateway
from tests.test_token_path import collect_until_end, start
from tests.test_workers import worker_process
from tokenbridge.producer.sweeper import LOST_CODE, GenerationSweeper
from tokenbridge.producer.worker import WORKER_GROUP
from tokenbridge.settings import Settings
from tokenbridge.wire.events import Event, decode_entry
from tokenbridge.wire.keys import Keys


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    async with Redis.from_url(settings.redis_url_value() or "") as client:
        yield client


def sweeper(redis: Redis, keys: Keys) -> GenerationSweeper:
    return GenerationSweeper(
        redis, keys, deadline_s=60, interval_s=60, retention_s=60, stream_max_len=1000
    )


async def _events(redis: Redis, keys: Keys, session_id: str) -> list[Event]:
    return [decode_entry(fields) for _, fields in await redis.xrange(keys.events(session_id))]


async def test_two_sweepers_end_a_running_generation_exactly_once(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    sid, gid = "s_sweep", "g_sweep"
    for event in (Event("start", gid, 0, model="demo"), Event("token", gid, 1, text="a")):
        await redis.xadd(keys.events(sid), event.to_fields())  # type: ignore[arg-type]
    await redis.hset(keys.generations(sid), gid, "running 1")
    done_sid, done_gid = "s_sweep_done", "g_done"
    await redis.hset(keys.generations(done_sid), done_gid, "done 5")
    first, second = sweeper(redis, keys), sweeper(redis, keys)
    await first.register([(sid, gid), (done_sid, done_gid)], due_now=True)
    ended = await asyncio.gather(first.sweep(), second.sweep(), first.sweep())
    assert sum(ended) == 1
    events = await _events(redis, keys, sid)
    assert [(e.kind, e.seq) for e in events] == [("start", 0), ("token", 1), ("error", 2)]
    assert events[-1].code == LOST_CODE
    assert await redis.hget(keys.generations(sid), gid) == b"done 2 lost"
    assert await redis.xlen(keys.events(done_sid)) == 0  # an ended generation is left alone
    assert await redis.zcard(keys.running) == 0
    assert await first.end_lost(sid, gid) == -1  # and never ended twice


async def test_a_generation_redis_lost_is_ended_after_the_tail(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    # Redis came back without the progress record: the stream's tail decides.
    await redis.xadd(keys.events("s_tail"), Event("token", "g_t", 7, text="x").to_fields())  # type: ignore[arg-type]
    s = sweeper(redis, keys)
    assert await s.end_lost("s_tail", "g_t") == 8
    assert await s.end_lost("s_tail", "g_t") == -1  # its own error is the tail now
    assert await s.end_lost("s_gone", "g_gone") == 0  # nothing left at all: seq 0
    [lost] = await _events(redis, keys, "s_gone")
    assert (lost.kind, lost.code) == ("error", LOST_CODE)


async def test_generation_whose_job_was_lost_with_its_worker_ends_as_lost(
    settings_factory: Any, redis: Redis
) -> None:
    settings = settings_factory(run_worker=False)
    keys = Keys(settings.key_prefix)
    doomed, survivor = worker_process(settings), worker_process(settings)
    try:
        doomed.start()
        await doomed.wait_ready(marker=b"ready")  # alone: the job is surely its
        async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            started = await start(http, params={"max_tokens": 100_000, "rate": 50})
            url, gen = started["events_url"], started["generation_id"]
            async with asyncio.timeout(60):
                early = await collect_until_end(http, url, gen, limit=5)
                doomed.stop(signal.SIGKILL)
                # The job is lost with it (dead-lettered, trimmed, or Redis lost it):
                pending: Any = await redis.xpending_range(keys.jobs, WORKER_GROUP, "-", "+", 10)
                ids = [row["message_id"] for row in pending]
                await redis.xack(keys.jobs, WORKER_GROUP, *ids)
                await redis.xdel(keys.jobs, *ids)
                survivor.start()  # its sweeper ends the generation
                await survivor.wait_ready(marker=b"ready")
                rest = await collect_until_end(http, url, gen, last_event_id=early[-1].id)
    finally:
        doomed.stop(signal.SIGKILL)
        survivor.stop()
    events = early + rest
    assert events[-1].event == "error" and events[-1].data["code"] == LOST_CODE
    seqs = [e.data["seq"] for e in events]
    assert seqs == list(range(len(seqs)))  # right after the last event written
