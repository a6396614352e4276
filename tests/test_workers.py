"""Generations run on workers: they outlive gateways, and a dead worker's job is recovered."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx

from tests.pipeline_helpers import pipeline_entries
from tests.servers import Gateway, GatewayProcess, redis_client
from tests.test_resume import assert_complete
from tests.test_token_path import collect_until_end, start
from tokenbridge.processors.analytics import AnalyticsProcessor
from tokenbridge.settings import Settings
from tokenbridge.store.stats import read_stats
from tokenbridge.wire.keys import Keys


def worker_process(settings: Settings) -> GatewayProcess:
    return GatewayProcess(
        {
            "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
            "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
            "TOKENBRIDGE_CONSUMER_HEARTBEAT_S": "0.5",
            "TOKENBRIDGE_CONSUMER_CLAIM_IDLE_MS": "1500",
            "TOKENBRIDGE_CONSUMER_BLOCK_MS": "1000",
        },
        args=["worker", "--log-level", "warning"],
    )


async def test_generation_outlives_the_gateway_that_accepted_it(settings_factory: Any) -> None:
    settings = settings_factory(run_worker=False)
    worker = worker_process(settings)
    worker.start()
    try:
        await worker.wait_ready(marker=b"ready")
        async with (
            Gateway(settings) as first,
            httpx.AsyncClient(base_url=first.url, timeout=30) as http,
        ):
            started = await start(http, params={"max_tokens": 200, "rate": 200})
            url, gen = started["events_url"], started["generation_id"]
            async with asyncio.timeout(30):
                early = await collect_until_end(http, url, gen, limit=20)
        # The first gateway is gone; the worker goes on; a new gateway serves the rest.
        async with (
            Gateway(settings) as second,
            httpx.AsyncClient(base_url=second.url, timeout=30) as http,
        ):
            async with asyncio.timeout(30):
                rest = await collect_until_end(http, url, gen, last_event_id=early[-1].id)
    finally:
        worker.stop()
    assert_complete(early + rest, gen, 200)


async def test_job_of_a_killed_worker_is_recovered_by_another(settings_factory: Any) -> None:
    # No processors in the gateway: they would process the entries checked below and the
    # pipeline trimmer would drop them before the check (a race that failed once in CI).
    settings = settings_factory(run_worker=False, run_processors=False)
    doomed = worker_process(settings)
    doomed.start()
    survivor = worker_process(settings)
    try:
        await doomed.wait_ready(marker=b"ready")
        async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            started = await start(http, params={"max_tokens": 10_000, "rate": 100})
            url, gen = started["events_url"], started["generation_id"]
            async with asyncio.timeout(60):
                early = await collect_until_end(http, url, gen, limit=10)
                doomed.stop(signal.SIGKILL)
                survivor.start()
                await survivor.wait_ready(marker=b"ready")
                rest = await collect_until_end(http, url, gen, last_event_id=early[-1].id)
            # A job queued after the crash runs normally on the survivor.
            again = await start(http, params={"max_tokens": 3, "rate": 0})
            async with asyncio.timeout(30):
                after = await collect_until_end(http, again["events_url"], again["generation_id"])
    finally:
        doomed.stop(signal.SIGKILL)
        survivor.stop()
    # The processors see the generation end too: one terminal entry, counted once.
    async with redis_client(settings.redis_url_value()) as redis:
        keys = Keys(settings.key_prefix)
        batches = await pipeline_entries(redis, keys, settings.pipeline_shards)
        analytics = AnalyticsProcessor(redis, keys, settings)
        for i, batch in enumerate(batches):
            await analytics.process(batch, f"{i}-0")
        total = (await read_stats(redis, keys))["total"]
    events = early + rest
    last = events[-1]
    assert last.event == "error" and last.data["code"] == "worker_lost"
    seqs = [e.data["seq"] for e in events]
    assert seqs == list(range(len(seqs)))  # the error follows the last written event
    assert_complete(after, again["generation_id"], 3)
    ends = [b.terminal for b in batches if b.generation_id == gen and b.terminal is not None]
    assert [(e.kind, e.code, e.seq) for e in ends] == [("error", "worker_lost", seqs[-1])]
    assert (total["generations"], total["errors_by_code"]) == (2, {"worker_lost": 1})
