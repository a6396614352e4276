"""Memory bounded by retention (issue 16, item 5): every key starts with the prefix, and no key
of a finished generation (apply-once markers included) outlives its retention."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.servers import Gateway, RedisServer
from tests.test_consumers import wait_for_length
from tests.test_token_path import collect_until_end, start
from tokenbridge.wire.keys import Keys

RETENTION_S = 1
MAX_GENERATION_S = 10
# Keys kept whatever the load, each bounded by a setting or by the deployment's size.
GLOBAL = (
    r"jobs|workers|running|dlq|log|processors|pipeline:\d+|pipeline:lost|auth:secret|auth:keys"
    r"|cache:lru|\{stats\}:total|\{stats\}:models|\{stats\}:model:[^:]+|wake:[0-9a-f]+:\d+"
    r"|\{stats\}:series:\d+|proc:[0-9a-f]+|procs"
)


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:  # alone on it: SCAN sees only what tokenbridge wrote
        yield server


@pytest.fixture
async def redis(own_redis: RedisServer) -> AsyncIterator[Redis]:
    async with Redis.from_url(own_redis.url) as client:
        yield client


async def _keys(redis: Redis) -> list[str]:
    return [k.decode() async for k in redis.scan_iter(count=1000)]


async def _until_expired(redis: Redis, ids: set[str]) -> None:
    """Wait for the expiry events (keyspace notifications) of every key naming one of ``ids``."""
    await redis.config_set("notify-keyspace-events", "Ex")
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe("__keyevent@0__:expired")
        left = {n for n in await _keys(redis) if any(i in n for i in ids)}
        while left:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                left.discard(message["data"].decode())
            else:  # a quiet second: re-read, the key may have gone before we subscribed
                left = {n for n in left if await redis.exists(n)}


async def test_no_key_of_a_finished_generation_outlives_its_retention(
    settings_factory: Any, own_redis: RedisServer, redis: Redis
) -> None:
    settings = settings_factory(
        redis_url=own_redis.url,
        stream_retention_s=RETENTION_S,
        stream_max_generation_s=MAX_GENERATION_S,
        analytics_retention_s=RETENTION_S,
        processors_once_ttl_s=3,
        cache_ttl_s=RETENTION_S,
        rate_limit_generations="1000/minute",
        rate_limit_tokens_per_minute=1_000_000,
    )
    keys = Keys(settings.key_prefix)
    ids: set[str] = set()
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        for n in range(6):  # the same prompt twice: the second comes from the cache
            started = await start(http, prompt=f"prompt {n // 2}")
            ids |= {started["session_id"], started["generation_id"]}
            async with asyncio.timeout(20):
                await collect_until_end(http, started["events_url"], started["generation_id"])
        async with asyncio.timeout(20):
            await wait_for_length(redis, keys.log, 6)  # the processors are done
        names = await _keys(redis)
        assert all(name.startswith(f"{keys.prefix}:") for name in names), names
        bound_ms = (MAX_GENERATION_S + RETENTION_S) * 1000
        for name in names:
            if re.fullmatch(rf"{keys.prefix}:(?:{GLOBAL})", name):
                continue
            ttl = await redis.pttl(name)
            if ttl == -2:  # expired since the SCAN
                continue
            assert 0 < ttl <= bound_ms, (name, ttl)  # every other key expires, within the bound
        assert any(":once:" in name for name in names)  # markers were written, with a TTL
        # Once the retention has passed, nothing of these generations is left.
        async with asyncio.timeout(MAX_GENERATION_S + RETENTION_S + 3):
            await _until_expired(redis, ids)
        names = await _keys(redis)
        stray = [n for n in names if not re.fullmatch(rf"{keys.prefix}:(?:{GLOBAL})", n)]
        assert not [n for n in stray if ":once:" in n], stray
