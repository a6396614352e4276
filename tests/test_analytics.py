"""Analytics through the pipeline: exact totals, in any order, after a crash; stats outputs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from tests.conftest import BOTH
from tests.pipeline_helpers import (
    batches_of,
    demo_job,
    events_of,
    own_token_counts,
    producer,
    submit,
)
from tests.servers import Gateway, GatewayProcess, redis_client
from tests.test_cli import clean_env, run_cli
from tests.test_consumers import wait_for_length
from tokenbridge.processors.analytics import AnalyticsProcessor
from tokenbridge.processors.generation_log import LoggingProcessor, read_log
from tokenbridge.producer.models.demo import DemoModel
from tokenbridge.settings import Settings
from tokenbridge.store.stats import read_session_stats, read_stats
from tokenbridge.wire.events import Event
from tokenbridge.wire.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "tbk_analytics-tests-0123456789"
ONLY_OURS = ["analytics", "logging"]  # cache and rate_limit have tests of their own


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    async with redis_client(settings.redis_url_value()) as client:
        yield client


@BOTH
async def test_hundred_demo_generations_totals_are_exact(settings_factory: Any) -> None:
    settings = settings_factory(processors=ONLY_OURS)
    keys = Keys(settings.key_prefix)
    rate = 100.0
    rng = random.Random(100)
    jobs = [demo_job(i, f"s_hundred{i % 10}", rng.randint(1, 40), rate) for i in range(100)]
    async with Gateway(settings) as gw:
        await submit(gw.runtime.redis, keys, jobs)
        async with asyncio.timeout(30):
            await wait_for_length(gw.runtime.redis, f"{keys.prefix}:log", 100)
    # Leaving the gateway drained the processors: every handler finished.
    reader = settings_factory(
        run_worker=False, run_processors=False, auth_disabled=False, api_keys=[API_KEY]
    )
    async with Gateway(reader) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        own = await own_token_counts(gw.runtime.redis, keys, {j.session_id for j in jobs})
        auth = {"authorization": f"Bearer {API_KEY}"}
        assert (await http.get("/v1/stats")).status_code == 401
        body = (await http.get("/v1/stats", headers=auth)).json()
        sessions = {}
        for session_id in sorted({j.session_id for j in jobs}):
            response = await http.get(f"/v1/sessions/{session_id}/stats", headers=auth)
            assert response.status_code == 200, response.text
            sessions[session_id] = response.json()
        missing = await http.get("/v1/sessions/s_nobody/stats", headers=auth)
    assert len(own) == 100 and sum(own.values()) == sum(j.params.max_tokens or 0 for j in jobs)
    total = body["total"]
    assert total["generations"] == 100
    assert total["tokens"] == sum(own.values())  # exact: the generations' own counts
    assert body["models"]["demo"]["tokens"] == total["tokens"]
    assert total["errors"] == total["cancels"] == 0
    assert total["ttft_ms_avg"] is not None and total["ttft_ms_avg"] >= 0
    # Demo tokens are paced at `rate` on absolute deadlines: never faster than asked.
    assert rate * 0.2 <= total["tokens_per_s"] <= rate * 1.25
    assert body["processors"]["analytics"]["failed"] == 0
    assert sum(row["pending"] for row in body["pipeline"]) == 0
    assert missing.status_code == 404
    by_generation = {g["generation_id"]: g for s in sessions.values() for g in s["generations"]}
    assert sum(s["total"]["tokens"] for s in sessions.values()) == total["tokens"]
    for job in jobs:
        figures = by_generation[job.generation_id]
        n = job.params.max_tokens or 0
        assert figures["finished"] and figures["tokens"] == own[job.generation_id] == n
        assert 0 <= figures["ttft_ms"] <= figures["duration_ms"]
        assert figures["duration_ms"] >= (n - 1) * 1000 / rate - 2  # ms-rounded timestamps
        assert (figures["tokens_per_s"] is None) == (n < 2)


async def test_figures_are_exact_in_any_order_and_under_redelivery(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    usage = {"prompt_tokens": 3, "completion_tokens": 31, "total_tokens": 34}
    ok = events_of("g_ok", 30, Event("end", "g_ok", 31, ts=1400, reason="stop", tokens=30,
                                     usage=usage))  # fmt: skip
    failed = events_of("g_err", 4, Event("error", "g_err", 5, ts=1100, code="provider_timeout"))
    cancelled = events_of("g_cxl", 2, Event("end", "g_cxl", 3, ts=1050, reason="cancelled"))
    batches = [
        *batches_of("s_o", ok, 4),
        *batches_of("s_o", failed, 2),
        *batches_of("s_o", cancelled, 1),
    ]
    deliveries = batches[::-1] + batches[::3]  # every batch, out of order, a third twice
    random.Random(7).shuffle(deliveries)
    processors = [
        AnalyticsProcessor(redis, keys, settings),
        LoggingProcessor(redis, keys, settings),
    ]
    for i, batch in enumerate([*deliveries, *batches]):  # ... then all again (a DLQ replay)
        for processor in processors:
            await processor.process(batch, f"{i}-0")
    stats = await read_stats(redis, keys)
    total = stats["total"]
    assert total["generations"] == 3
    assert total["tokens"] == 31 + 4 + 2  # usage.completion_tokens where given, else events
    assert total["prompt_tokens"] == 3
    assert (total["errors"], total["errors_by_code"], total["cancels"]) == (
        1, {"provider_timeout": 1}, 1,
    )  # fmt: skip
    assert total["ttft_ms_avg"] == 10  # every first token came 10 ms after its start
    assert total["duration_ms_avg"] == round((400 + 100 + 50) / 3, 3)
    assert total["tokens_per_s"] == round((31 + 4 + 2) * 1000 / (390 + 90 + 40), 3)
    session = await read_session_stats(redis, keys, "s_o")
    assert session is not None and session["total"] == total
    records = {r["generation_id"]: r for r in await read_log(redis, keys)}
    assert len(await read_log(redis, keys)) == 3  # one record each, whatever the deliveries
    assert records["g_ok"]["text"] == "".join(f" w{i}" for i in range(1, 31))
    assert (records["g_ok"]["outcome"], records["g_ok"]["tokens"]) == ("stop", "31")
    assert records["g_ok"]["prompt_sha256"] == "ab" * 32
    assert (records["g_err"]["outcome"], records["g_err"]["error_code"]) == (
        "error", "provider_timeout",
    )  # fmt: skip
    assert records["g_cxl"]["reason"] == "cancelled"


async def test_processor_process_killed_mid_way_totals_stay_exact(
    settings_factory: Any, redis_server: Any
) -> None:
    settings = settings_factory(run_processors=False)
    keys = Keys(settings.key_prefix)
    async with redis_client(settings.redis_url_value()) as redis:
        make = producer(redis, keys, settings)
        # Ten waves of ten generations, a few tokens per pipeline entry: ~3,000 entries, and
        # generations that finish all along the pipeline, not only at its end.
        jobs = [demo_job(i, f"s_kill{i % 7}", 20 + i % 20, 400) for i in range(100)]
        expected = 0
        for wave in range(10):
            results = await asyncio.gather(
                *(make.run(job, DemoModel()) for job in jobs[wave * 10 : wave * 10 + 10])
            )
            expected += sum(r.tokens for r in results)
        env = {
            "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
            "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
            "TOKENBRIDGE_CONSUMER_HEARTBEAT_S": "0.5",
            "TOKENBRIDGE_CONSUMER_CLAIM_IDLE_MS": "1500",
            "TOKENBRIDGE_CONSUMER_BLOCK_MS": "1000",
            "TOKENBRIDGE_PROCESSORS": ",".join(ONLY_OURS),
            "TOKENBRIDGE_PROCESSORS_EXTRA": "tests.pipeline_helpers:Slow",
            "TOKENBRIDGE_PROCESSORS_CONCURRENCY": "8",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        }
        args = ["worker", "--no-generations", "--processors", "--log-level", "warning"]
        first, second = GatewayProcess(env, args), GatewayProcess(env, args)
        log_key = f"{keys.prefix}:log"
        try:
            first.start()
            async with asyncio.timeout(60):
                await first.wait_ready(marker=b"ready")
                await wait_for_length(redis, log_key, 30)
                first.stop(signal.SIGKILL)
                pending = [await redis.xpending(keys.pipeline(n), "processors") for n in range(4)]
                counted_at_kill = (await read_stats(redis, keys))["total"]["generations"]
                second.start()
                await second.wait_ready(marker=b"ready")
                await wait_for_length(redis, log_key, 100)
            second.stop()  # SIGTERM: in-flight entries finish before it exits
        finally:
            first.stop(signal.SIGKILL)
            second.stop(signal.SIGKILL)
        totals = (await read_stats(redis, keys))["total"]
        logged = await redis.xlen(log_key)
    assert sum(p["pending"] for p in pending) > 0 and counted_at_kill < 100  # killed mid-way
    assert (totals["generations"], totals["tokens"]) == (100, expected)
    assert logged == 100  # the Redis log sink is written exactly once per generation


async def test_stats_command_shows_totals_and_a_session(settings: Settings, redis: Redis) -> None:
    keys = Keys(settings.key_prefix)
    end = Event("end", "g_cli", 4, ts=1300, reason="length", tokens=3)
    analytics = AnalyticsProcessor(redis, keys, settings)
    for batch in batches_of("s_cli", events_of("g_cli", 3, end), 2):
        await analytics.process(batch, "1-0")
    env = clean_env(
        TOKENBRIDGE_REDIS_URL=settings.redis_url_value() or "",
        TOKENBRIDGE_KEY_PREFIX=settings.key_prefix,
    )
    code, out, err = await run_cli("stats", "--json", env=env)
    assert code == 0, err
    body = json.loads(out)
    assert (body["total"]["generations"], body["models"]["m1"]["tokens"]) == (1, 3)
    assert [row["stream"] for row in body["pipeline"]] == [keys.pipeline(n) for n in range(4)]
    code, out, err = await run_cli("stats", "--session", "s_cli", env=env)
    assert code == 0, err
    assert "g_cli" in out and "length" in out
    code, _, err = await run_cli("stats", "--session", "s_none", env=env)
    assert code == 1 and "no analytics recorded for session s_none" in err
