"""Reclaim at the pace of the loss (issue 16, item 4): a survivor drains every pending entry of
a SIGKILLed processor process within about the claim-idle time, not 16 per heartbeat."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.pipeline_helpers import Stalled
from tests.servers import Gateway, GatewayProcess
from tokenbridge.settings import Settings
from tokenbridge.wire.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = 500
CLAIM_IDLE_MS = 3000


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url_value() or "")
    async with client:
        yield client


def _entry(n: int) -> dict[str, str]:
    event = {"kind": "token", "seq": 1, "ts": 1, "text": "a"}
    return {"v": "1", "sid": "s_pace", "gen": f"g_pace{n}", "model": "demo",
            "events": json.dumps([event])}  # fmt: skip


async def _pending_of(redis: Redis, key: str, count: int) -> None:
    """Bounded wait until ``count`` entries are pending in the group (the dead one holds them)."""
    async with asyncio.timeout(30):
        while True:
            summary: Any = await redis.xpending(key, "processors")
            if summary["pending"] >= count:
                return
            await asyncio.sleep(0.05)


async def test_survivor_drains_500_entries_of_a_killed_processor_within_claim_idle(
    settings_factory: Any, redis: Redis
) -> None:
    overrides: dict[str, Any] = {
        "pipeline_shards": 1,
        "processors": [],
        "processors_extra": ["tests.pipeline_helpers:Stalled"],
        "consumer_claim_idle_ms": CLAIM_IDLE_MS,
    }
    settings = settings_factory(**overrides)
    keys = Keys(settings.key_prefix)
    env = {
        "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
        "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
        "TOKENBRIDGE_PIPELINE_SHARDS": "1",
        "TOKENBRIDGE_PROCESSORS": "",
        "TOKENBRIDGE_PROCESSORS_EXTRA": "tests.pipeline_helpers:Stalled",  # never released
        "TOKENBRIDGE_PROCESSORS_CONCURRENCY": str(ENTRIES),
        "TOKENBRIDGE_CONSUMER_HEARTBEAT_S": "0.5",
        "TOKENBRIDGE_CONSUMER_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}",
    }
    doomed = GatewayProcess(env, ["worker", "--no-generations", "--processors"])
    key = keys.pipeline(0)
    Stalled.reset()
    try:
        doomed.start()
        await doomed.wait_ready(marker=b"ready")
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(ENTRIES):
                pipe.xadd(key, _entry(n))  # type: ignore[arg-type]
            await pipe.execute()
        await _pending_of(redis, key, ENTRIES)
        async with Gateway(settings, worker=False):  # the survivor: concurrency 16
            Stalled.gate.set()
            Stalled.target = ENTRIES
            doomed.stop(signal.SIGKILL)
            async with asyncio.timeout(CLAIM_IDLE_MS / 1000 + 2):
                await Stalled.reached.wait()
    finally:
        doomed.stop(signal.SIGKILL)
    assert len(Stalled.seen) == ENTRIES
