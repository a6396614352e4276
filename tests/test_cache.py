"""The response cache end to end: a repeated request is replayed through the session stream
without a model call (the local model server counts calls), and only when it should be."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import BOTH
from tests.model_server import Answer, FailMidStream, ModelServer
from tests.servers import Gateway
from tests.sse_client import SSEEvent
from tests.test_token_path import collect_until_end
from tokenbridge.processors.cache import CachingProcessor, ResponseCache
from tokenbridge.producer.jobs import GenerationJob, Message
from tokenbridge.producer.models.base import GenerationParams
from tokenbridge.runtime import Runtime
from tokenbridge.wire.events import Event
from tokenbridge.wire.pipeline import PipelineBatch

TOKENS = ("Streams", " keep", " every", " token", ".")


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer(Answer(tokens=TOKENS)) as srv:
        yield srv


class Client:
    """Starts generations on a gateway and reads them to their end; knows when the pipeline
    has processed a generation's end (its answer is in the cache, if it is to be)."""

    def __init__(self, gateway: Gateway, http: httpx.AsyncClient) -> None:
        self.gateway = gateway
        self.http = http
        self._ended: dict[str, asyncio.Event] = {}
        processor = gateway.runtime.processor
        cache = next(p for p in processor.processors if p.name == "cache")
        process = cache.process

        async def process_and_tell(batch: PipelineBatch, entry_id: str) -> None:
            await process(batch, entry_id)
            if batch.terminal is not None:
                self._ended.setdefault(batch.generation_id, asyncio.Event()).set()

        cache.process = process_and_tell

    async def run(self, model: str = "gpt", prompt: str = "why streams?", **params: Any) -> Any:
        """The events of one generation, start to end."""
        body = {"model": model, "prompt": prompt, "params": params}
        response = await self.http.post("/v1/generations", json=body)
        assert response.status_code == 202, response.text
        started = response.json()
        async with asyncio.timeout(10):
            return await collect_until_end(
                self.http, started["events_url"], started["generation_id"]
            )

    async def processed(self, events: list[SSEEvent]) -> list[SSEEvent]:
        """Wait until the pipeline's cache processor has handled the end of ``events``."""
        generation_id = events[0].data["generation_id"]
        async with asyncio.timeout(10):
            await self._ended.setdefault(generation_id, asyncio.Event()).wait()
        return events


@pytest.fixture
async def client(settings_factory: Any, server: ModelServer) -> AsyncIterator[Client]:
    models = {"gpt": server.model_config(), "demo": {"adapter": "demo"}}
    async with (
        Gateway(settings_factory(models=models)) as gw,
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        yield Client(gw, http)


def texts(events: list[SSEEvent]) -> list[str]:
    return [e.data["text"] for e in events if e.event == "token"]


async def test_same_request_twice_is_served_from_the_cache(
    client: Client, server: ModelServer
) -> None:
    first = await client.run(temperature=0.0)
    await client.processed(first)
    second = await client.run(temperature=0.0)
    assert len(server.requests) == 1  # the second one never reached the model
    assert texts(second) == texts(first) == list(TOKENS)
    assert [e.event for e in second] == [e.event for e in first]
    assert [e.data["seq"] for e in second] == [e.data["seq"] for e in first]
    assert "cached" not in first[0].data
    assert second[0].data["cached"] is True
    assert second[0].data["model"] == "gpt"
    end_first, end_second = first[-1].data, second[-1].data
    assert end_second["reason"] == end_first["reason"] == "stop"
    assert end_second["tokens"] == end_first["tokens"] == len(TOKENS)
    assert end_second["usage"] == end_first["usage"]


async def test_opt_out_per_request(client: Client, server: ModelServer) -> None:
    first = await client.run(temperature=0.0, cache=False)
    await client.processed(first)
    second = await client.run(temperature=0.0, cache=False)
    await client.processed(second)
    assert len(server.requests) == 2
    assert all("cached" not in events[0].data for events in (first, second))
    assert all("cache" not in body for body in server.requests)  # never sent to the provider
    # An opted-out answer did not fill the cache either: a cacheable ask still calls the model.
    third = await client.run(temperature=0.0)
    assert len(server.requests) == 3 and "cached" not in third[0].data


@pytest.mark.parametrize("params", [{"temperature": 0.7}, {}], ids=["warm", "unset"])
async def test_non_deterministic_request_is_not_cached(
    client: Client, server: ModelServer, params: dict[str, Any]
) -> None:
    first = await client.run(**params)
    await client.processed(first)
    second = await client.run(**params)
    assert len(server.requests) == 2
    assert "cached" not in second[0].data
    assert not await client.gateway.runtime.redis.exists(client.gateway.runtime.cache.lru_key)


async def test_failed_answer_is_not_cached(client: Client, server: ModelServer) -> None:
    server.script(FailMidStream(tokens=("Str",)))
    first = await client.run(temperature=0.0)
    assert first[-1].event == "error"
    await client.processed(first)
    second = await client.run(temperature=0.0)
    assert len(server.requests) == 2
    assert "cached" not in second[0].data and texts(second) == list(TOKENS)


async def test_demo_model_is_cached_and_rate_is_not_part_of_the_key(client: Client) -> None:
    first = await client.run("demo", "a demo prompt", max_tokens=8, rate=0)
    await client.processed(first)
    second = await client.run("demo", "a demo prompt", max_tokens=8, rate=5)
    assert second[0].data["cached"] is True
    assert texts(second) == texts(first) and len(texts(first)) == 8
    assert second[-1].data["reason"] == "length"
    other = await client.run("demo", "a demo prompt", max_tokens=9, rate=0)
    assert "cached" not in other[0].data  # another max_tokens is another request


async def test_cache_scope_all_widens_it(settings_factory: Any, server: ModelServer) -> None:
    settings = settings_factory(models={"gpt": server.model_config()}, cache_scope="all")
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        client = Client(gw, http)
        await client.processed(await client.run(temperature=0.9))
        second = await client.run(temperature=0.9)
    assert len(server.requests) == 1 and second[0].data["cached"] is True


async def test_size_bound_evicts_the_least_recently_used(settings_factory: Any) -> None:
    settings = settings_factory(cache_max_entries=2)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        client = Client(gw, http)
        for prompt in ("one", "two"):
            await client.processed(await client.run("demo", prompt, max_tokens=3, rate=0))
        hit = await client.run("demo", "one", max_tokens=3, rate=0)  # "one" is used again
        await client.processed(await client.run("demo", "three", max_tokens=3, rate=0))
        assert hit[0].data["cached"] is True
        assert await gw.runtime.redis.zcard(gw.runtime.cache.lru_key) == 2
        one = await client.run("demo", "one", max_tokens=3, rate=0)
        two = await client.run("demo", "two", max_tokens=3, rate=0)  # evicted by "three"
    assert one[0].data["cached"] is True
    assert "cached" not in two[0].data


@BOTH
async def test_caching_processor_fills_once_from_a_pipeline_batch(settings_factory: Any) -> None:
    """CachingProcessor at a batch's ``end``: the answer is read back from the session stream
    and kept; the same entry delivered again changes nothing."""
    settings = settings_factory(cache_ttl_s=60)
    async with Runtime(settings, worker=False, processors=False) as runtime:
        cache: ResponseCache = runtime.cache
        job = GenerationJob(
            generation_id="g_fill",
            session_id="s_fill",
            model="demo",
            messages=[Message(role="user", content="fill me")],
            params=GenerationParams(max_tokens=2),
        )
        assert not await cache.replay(job, runtime.producer)  # a miss leaves the note
        end = Event("end", "g_fill", 3, reason="length", tokens=2)
        await runtime.producer.write_events(
            job,
            Event("start", "g_fill", 0, model="demo"),
            Event("token", "g_fill", 1, text="ab"),
            Event("token", "g_fill", 2, text="cd"),
            end,
        )
        processor = CachingProcessor(cache)
        batch = PipelineBatch("s_fill", "g_fill", "demo", (end,))
        await processor.process(batch, "1-0")
        await processor.process(batch, "1-0")
        assert processor.filled == 1
        digest = cache.digest(job)
        assert digest is not None
        ttl = await runtime.redis.pttl(cache.answer_key(digest))
        assert 0 < ttl <= 60_000
        again = job.model_copy(update={"generation_id": "g_again", "session_id": "s_again"})
        assert await cache.replay(again, runtime.producer)
        entries = await runtime.redis.xrange(runtime.keys.events("s_again"))
    assert [fields[b"kind"] for _, fields in entries] == [b"start", b"token", b"token", b"end"]
    assert entries[0][1][b"cached"] == b"1"
    assert [fields.get(b"text") for _, fields in entries[1:3]] == [b"ab", b"cd"]


async def test_cancelled_answer_is_not_kept(settings_factory: Any) -> None:
    async with Runtime(settings_factory(), worker=False, processors=False) as runtime:
        cache = runtime.cache
        job = GenerationJob(
            generation_id="g_cut",
            session_id="s_cut",
            model="demo",
            messages=[Message(role="user", content="cut me")],
        )
        assert not await cache.replay(job, runtime.producer)
        await runtime.producer.write_events(
            job,
            Event("start", "g_cut", 0, model="demo"),
            Event("token", "g_cut", 1, text="ab"),
            Event("end", "g_cut", 2, reason="cancelled", tokens=1),
        )
        assert not await cache.fill("s_cut", "g_cut")
        assert not await cache.replay(job, runtime.producer)
