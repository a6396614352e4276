"""The processor pipeline: the feed, isolation, the generation log, loading, examples."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import BOTH
from tests.model_server import Answer, ModelServer
from tests.pipeline_helpers import (
    batches_of,
    demo_job,
    events_of,
    own_token_counts,
    pipeline_entries,
    producer,
    submit,
)
from tests.servers import Gateway, redis_client
from tests.test_cli import clean_env, run_cli
from tests.test_consumers import wait_for_length
from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.exceptions import ConfigurationError
from tokenbridge.model_config import ModelConfig
from tokenbridge.processors.batcher import Batcher, process_one
from tokenbridge.processors.generation_log import read_log
from tokenbridge.processors.registry import ProcessorContext, load_processors
from tokenbridge.producer.jobs import GenerationJob, Message
from tokenbridge.producer.models.demo import DemoModel
from tokenbridge.settings import Settings
from tokenbridge.store.stats import read_processor_stats, read_stats
from tokenbridge.wire.events import Event, decode_entry
from tokenbridge.wire.keys import Keys
from tokenbridge.wire.pipeline import PipelineBatch, prompt_digest, shard_of

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "tbk_processor-tests-" + secrets.token_hex(8)
ONLY_OURS = ["analytics", "logging"]  # cache and rate_limit have tests of their own


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    async with redis_client(settings.redis_url_value()) as client:
        yield client


@BOTH
async def test_producer_writes_one_pipeline_entry_per_batch(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    job = demo_job(1, "s_feed", max_tokens=3000, rate=0)
    result = await producer(redis, keys, settings).run(job, DemoModel())
    batches = await pipeline_entries(redis, keys, settings.pipeline_shards)
    assert len(batches) == result.writes < 3002  # one per flushed batch, not one per token
    assert {b.shard for b in batches} == {shard_of("s_feed", settings.pipeline_shards)}
    events = [e for b in batches for e in b.events]
    assert [e.seq for e in events] == list(range(3002))
    assert events[-1].kind == "end" and events[-1].tokens == 3000
    assert batches[0].prompt_sha256 == prompt_digest(
        [{"role": "user", "content": "prompt number 1"}]
    )
    assert all(b.prompt_sha256 == "" for b in batches[1:])
    stream = [decode_entry(f) for _, f in await redis.xrange(keys.events("s_feed"))]
    assert [e.text for e in stream] == [e.text for e in events]  # the same events, both sides


@BOTH
async def test_a_processor_raising_on_every_entry_does_not_stop_the_others(
    settings_factory: Any,
) -> None:
    settings = settings_factory(
        processors=ONLY_OURS, processors_extra=["tests.pipeline_helpers:AlwaysFails"]
    )
    keys = Keys(settings.key_prefix)
    jobs = [demo_job(i, f"s_fail{i % 3}", 5 + i, 200) for i in range(10)]
    async with Gateway(settings) as gw:
        redis = gw.runtime.redis
        await submit(redis, keys, jobs)
        async with asyncio.timeout(30):
            await wait_for_length(redis, f"{keys.prefix}:log", 10)
        processor = gw.runtime.processor
    async with redis_client(settings.redis_url_value()) as redis:
        # Entries ever added (the processors' trimmer drops processed ones from the streams).
        shards = range(settings.pipeline_shards)
        infos = [await redis.xinfo_stream(keys.pipeline(n)) for n in shards]
        entries = sum(int(info["entries-added"]) for info in infos)
        totals = (await read_stats(redis, keys))["total"]
        published = (await read_processor_stats(redis, keys))["processors"]
        letters = await DeadLetters(redis, keys.dead_letters).letters(count=10_000)
        own = await own_token_counts(redis, keys, {j.session_id for j in jobs})
    stats = processor.stats
    assert stats["always_fails"].processed == 0
    assert stats["always_fails"].failed == stats["always_fails"].dead_lettered == entries
    assert "RuntimeError: always fails" in stats["always_fails"].last_error
    assert stats["analytics"].processed == stats["logging"].processed == entries
    assert stats["analytics"].failed == stats["logging"].failed == 0
    assert published["always_fails"]["failed"] == entries  # what /v1/stats shows
    assert (totals["generations"], totals["tokens"]) == (10, sum(own.values()))
    assert len(letters) == entries
    assert all(lt.error.startswith("processor always_fails: RuntimeError") for lt in letters)


async def test_finished_generation_is_logged_with_its_text_and_no_secret(
    settings_factory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = "sk-live-" + secrets.token_hex(24)
    monkeypatch.setenv("TB_PROCESSOR_TEST_KEY", secret)
    tokens = ("Streams", " keep", " every", " token", ".")
    log_file = tmp_path / "generations.jsonl"
    with ModelServer(Answer(tokens=tokens)) as server:
        model = server.model_config(api_key_env="TB_PROCESSOR_TEST_KEY")
        for sink in ("redis", "file"):
            settings = settings_factory(
                processors=ONLY_OURS,
                models={"gpt-test": model, "demo": ModelConfig(adapter="demo")},
                generation_log_path=str(log_file) if sink == "file" else None,
            )
            keys = Keys(settings.key_prefix)
            job = GenerationJob(
                generation_id="g_" + secrets.token_hex(8),
                session_id=f"s_log_{sink}",
                model="gpt-test",
                messages=[Message(role="user", content="prompt number 0")],
            )
            async with Gateway(settings) as gw:
                await submit(gw.runtime.redis, keys, [job])
                async with asyncio.timeout(20):
                    if sink == "redis":
                        await wait_for_length(gw.runtime.redis, f"{keys.prefix}:log", 1)
                        [record] = await read_log(gw.runtime.redis, keys)
                        everything = repr(await gw.runtime.redis.xrange(f"{keys.prefix}:log"))
                    else:
                        await wait_for_length(gw.runtime.redis, keys.events(job.session_id), 7)
        assert server.headers[0]["authorization"] == f"Bearer {secret}"  # the key was used
    assert record["text"] == "".join(tokens) and record["model"] == "gpt-test"
    assert record["session_id"] == "s_log_redis" and record["outcome"] == "stop"
    assert record["tokens"] == "5" and int(record["duration_ms"]) >= 0
    assert record["prompt_sha256"] == prompt_digest([m.model_dump() for m in job.messages])
    assert secret not in everything and "prompt number" not in everything
    # The file sink: leaving the gateway drained its processors, so the line is written.
    [line] = log_file.read_text().splitlines()
    on_disk = json.loads(line)
    assert on_disk["text"] == "".join(tokens) and on_disk["tokens"] == 5
    assert on_disk["session_id"] == "s_log_file" and secret not in line


async def test_example_processor_from_docs_runs_in_the_pipeline(
    settings_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    settings = settings_factory(
        processors=["logging"], processors_extra=["my_processor:TokenFrequency"]
    )
    keys = Keys(settings.key_prefix)
    jobs = [demo_job(i, "s_example", 30, 0) for i in range(5)]
    async with Gateway(settings) as gw:
        redis = gw.runtime.redis
        await submit(redis, keys, jobs)
        async with asyncio.timeout(20):
            await wait_for_length(redis, f"{keys.prefix}:log", 5)
    async with redis_client(settings.redis_url_value()) as redis:
        expected: Counter[str] = Counter()
        for _, fields in await redis.xrange(keys.events("s_example")):
            event = decode_entry(fields)
            if event.kind == "token":
                expected[event.text.strip().lower()] += 1
        counted = await redis.zrange(f"{keys.prefix}:{{tokens}}:frequency", 0, -1, withscores=True)
    assert {k.decode(): int(v) for k, v in counted} == dict(expected)


async def test_invalid_pipeline_entry_is_dead_lettered_and_the_loop_goes_on(
    settings_factory: Any,
) -> None:
    settings = settings_factory(processors=ONLY_OURS)
    keys = Keys(settings.key_prefix)
    async with Gateway(settings) as gw:
        redis = gw.runtime.redis
        await redis.xadd(
            keys.pipeline(0), {"v": "1", "sid": "s_bad", "gen": "g_bad", "events": "["}
        )
        await submit(redis, keys, [demo_job(0, "s_after_bad", 3, 0)])
        async with asyncio.timeout(20):
            await wait_for_length(redis, keys.dead_letters, 1)
            await wait_for_length(redis, f"{keys.prefix}:log", 1)
        [letter] = await DeadLetters(redis, keys.dead_letters).letters()
    assert letter.error.startswith("invalid entry: field 'events' is not JSON")
    assert letter.stream == keys.pipeline(0) and letter.group == "processors"


async def test_processors_are_switched_on_by_name_and_errors_are_clear(
    settings_factory: Any,
) -> None:
    redis = Redis()  # never connected: building processors does no I/O
    await redis.aclose()

    def names(**overrides: Any) -> list[str]:
        settings = settings_factory(**overrides)
        context = ProcessorContext(redis, Keys(settings.key_prefix), settings)
        return [p.name for p in load_processors(context)]

    assert names() == ["analytics", "logging", "cache", "rate_limit"]
    assert names(processors=["logging"]) == ["logging"]
    assert names(processors=[], processors_extra=["tests.pipeline_helpers.Slow"]) == ["slow"]
    with pytest.raises(ConfigurationError, match="unknown processor 'nope'"):
        names(processors=["nope"])
    with pytest.raises(ConfigurationError, match="cannot import 'no_such_module'"):
        names(processors_extra=["no_such_module:Thing"])
    with pytest.raises(ConfigurationError, match="two processors are named 'slow'"):
        names(processors_extra=["tests.pipeline_helpers:Slow"] * 2)


async def test_batcher_groups_what_arrives_while_a_group_is_handled() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    groups: list[list[int]] = []

    async def handle(items: list[int]) -> list[int]:
        groups.append(items)
        started.set()
        await release.wait()
        if 13 in items:
            raise ValueError("13 fails its whole group")
        return [i * 2 for i in items]

    batcher: Batcher[int, int] = Batcher(handle, max_items=3)
    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        runner = group.create_task(batcher.run())
        first = asyncio.ensure_future(batcher.submit(1))
        await started.wait()  # the first group is being handled: the next ones queue up
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3, 4, 5, 13)]
        release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        runner.cancel()
    assert results[:4] == [2, 4, 6, 8]
    assert all(isinstance(r, ValueError) for r in results[4:])  # 13 failed its whole group
    assert groups == [[1], [2, 3, 4], [5, 13]]


async def test_process_one_is_a_group_of_one_with_its_error_raised() -> None:
    end = Event("end", "g_one", 3, ts=2000, reason="stop", tokens=2)
    first, second = batches_of("s_one", events_of("g_one", 2, end), size=2)
    assert first.first_token is not None and first.first_token.seq == 1
    assert second.first_token is not None and second.first_token.seq == 2
    assert PipelineBatch("s_one", "g_one", "m1", (end,)).first_token is None
    groups: list[list[tuple[PipelineBatch, str]]] = []

    async def process_many(items: Sequence[tuple[PipelineBatch, str]]) -> list[Exception | None]:
        groups.append(list(items))
        return [ValueError(entry_id) if entry_id == "2-0" else None for _, entry_id in items]

    await process_one(process_many, first, "1-0")
    with pytest.raises(ValueError, match="2-0"):
        await process_one(process_many, second, "2-0")
    assert groups == [[(first, "1-0")], [(second, "2-0")]]


async def test_worker_with_neither_generations_nor_processors_is_refused(
    redis_server: Any,
) -> None:
    env = clean_env(TOKENBRIDGE_REDIS_URL=redis_server.url)
    code, _, err = await run_cli("worker", "--no-generations", "--no-processors", env=env)
    assert code == 1 and "leaves this worker nothing to do" in err
