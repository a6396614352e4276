"""Presence records of every process, and the 15-minute analytics series, on a real Redis."""

from __future__ import annotations

from typing import Any

import httpx

from tests.servers import Gateway
from tokenbridge.presence import Presence, list_processes
from tokenbridge.processors.analytics import GenerationFigures
from tokenbridge.runtime import Runtime
from tokenbridge.settings import Settings
from tokenbridge.store.series import (
    bin_of,
    bucket_of,
    percentile,
    read_series,
    series_increments,
)
from tokenbridge.wire.events import now_ms


async def test_every_process_is_listed_until_it_stops_or_dies(settings: Settings) -> None:
    fast = settings.model_copy(update={"presence_heartbeat_s": 0.2})
    async with Runtime(fast, worker=True, processors=True) as worker:
        await worker.presence.publish()
        [record] = await list_processes(worker.redis, worker.keys)
        assert record["node_id"] == worker.node_id
        assert record["roles"] == ["worker", "processor"]
        assert record["counters"]["worker"]["name"] == worker.worker.name  # type: ignore[union-attr]
        redis, keys = worker.redis, worker.keys

        # A process that died without a word: its record expires, readers drop its index entry.
        ghost = Presence(redis, keys, "ghost", ["gateway"], heartbeat_s=0.2)
        await ghost.publish()
        assert {r["node_id"] for r in await list_processes(redis, keys)} == {
            worker.node_id,
            "ghost",
        }
        await redis.delete(keys.process("ghost"))  # as its TTL would
        assert [r["node_id"] for r in await list_processes(redis, keys)] == [worker.node_id]
        assert await redis.zscore(keys.processes, "ghost") is None
    # A process that stops cleanly removes its record at once.
    async with Runtime(settings, worker=False, processors=False) as reader:
        assert await reader.redis.exists(keys.process(worker.node_id)) == 0
        assert await reader.redis.zscore(keys.processes, worker.node_id) is None


async def test_gateway_publishes_its_connections(settings_factory: Any) -> None:
    settings = settings_factory(presence_heartbeat_s=0.2)
    async with (
        Gateway(settings) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
    ):
        body = {"model": "demo", "prompt": "x", "params": {"max_tokens": 3}}
        started = (await http.post("/v1/generations", json=body)).json()
        runtime = gateway.runtime
        async with http.stream("GET", started["events_url"]) as response:
            async for line in response.aiter_lines():
                if line == "event: end":
                    break
            await runtime.presence.publish()  # the stream is still open
            [record] = await list_processes(runtime.redis, runtime.keys)
        connections = record["counters"]["connections"]
        assert connections["by_transport"] == {"sse": 1} and connections["sessions"] == 1
        assert connections["events_sent"] >= 5  # start, 3 tokens, end
        assert record["counters"]["fanout"]["sessions"] == 1  # a live reader for it
        assert record["roles"] == ["gateway", "worker", "processor"]
        assert record["draining"] is False

        gateway.app.state.drain()  # what SIGTERM does first
        await runtime.presence.publish()
        [record] = await list_processes(runtime.redis, runtime.keys)
        assert record["draining"] is True


async def test_series_of_the_last_15_minutes(settings: Settings) -> None:
    async with Runtime(settings, worker=False, processors=False) as runtime:
        figures = [
            GenerationFigures.compute("m", "stop", 10, 0, 100, 1100),
            GenerationFigures.compute("m", "error:provider_error", 0, 0, None, 50),
            GenerationFigures.compute("m", "cancelled", 3, 0, 200, 700),
        ]
        key = runtime.keys.stats_series(bucket_of(now_ms()))
        for figure in figures:
            increments = series_increments(
                "m", figure.outcome, figure.tokens, figure.ttft_ms, figure.tokens_per_s
            )
            for field, amount in increments.items():
                await runtime.redis.hincrby(key, field, int(amount))
        series = await read_series(runtime.redis, runtime.keys, now_ms())
        assert series["generations"] == {"finished": 1, "failed": 1, "cancelled": 1}
        assert series["tokens"] == 13 and len(series["t_ms"]) == 90
        ttft = series["models"]["m"]["ttft_ms"]["window"]  # 100 and 200 ms
        assert 100 / 1.25 <= ttft["p50"] <= 100 * 1.25
        assert 200 / 1.25 <= ttft["p99"] <= 200 * 1.25


def test_percentile_of_a_log_histogram_is_within_its_bin() -> None:
    values = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000]
    histogram: dict[int, int] = {}
    for value in values:
        index = bin_of(value)
        histogram[index] = histogram.get(index, 0) + 1
    p50, p99 = percentile(histogram, 0.5), percentile(histogram, 0.99)
    assert p50 is not None and 50 / 1.25 <= p50 <= 50 * 1.25
    assert p99 is not None and 1000 / 1.25 <= p99 <= 1000 * 1.25
    assert percentile({}, 0.5) is None
