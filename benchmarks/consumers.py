"""Consumer-group throughput: our StreamConsumer against the seed's design.

``python -m benchmarks.consumers [--entries N]`` starts an embedded Redis, fills a stream, and
measures entries/s through a no-op handler:

* the seed's loop: ``XREADGROUP COUNT 10 BLOCK 1000``, handle and ``XACK`` one by one, then
  ``sleep(0.1)`` (measured over a few seconds: it cannot finish a large stream);
* one :class:`StreamConsumer` (burst mode: it stops when the group has nothing pending);
* three StreamConsumers in three processes on the same group.

Each process runs ``python -m benchmarks.consumers --worker URL STREAM NAME`` and prints its
count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from functools import partial

from redis.asyncio import Redis

from tokenbridge.consumers.stream_consumer import Delivery, StreamConsumer
from tokenbridge.store.client import blocking_client, command_client
from tokenbridge.store.embedded import EmbeddedRedis

GROUP = "bench"


async def _fill(redis: Redis, stream: str, n: int) -> None:
    await redis.delete(stream)
    for start in range(0, n, 5000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 5000)):
                pipe.xadd(stream, {"n": i, "payload": "x" * 40})
            await pipe.execute()
    await redis.xgroup_create(stream, GROUP, id="0")


async def _worker(url: str, stream: str, name: str) -> None:
    redis = command_client(url, 8, 10)
    handled = 0

    async def handle(delivery: Delivery) -> None:
        nonlocal handled
        handled += 1

    consumer = StreamConsumer(
        redis,
        partial(blocking_client, url, 1000),
        stream,
        GROUP,
        name,
        handle,
        concurrency=512,
        count=512,
        block_ms=100,
        burst=True,
    )
    started = time.perf_counter()
    await consumer.run()
    print(f"{handled} {time.perf_counter() - started:.4f}", flush=True)
    await redis.aclose()
    await redis.connection_pool.disconnect()


async def _seed_design(redis: Redis, stream: str, seconds: float) -> float:
    """The seed's StreamConsumer: read 10, handle and ack one at a time, sleep 100 ms."""
    handled = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        reply = await redis.xreadgroup(GROUP, "seed", {stream: ">"}, count=10, block=1000)
        for _, entries in reply or []:
            for entry_id, _fields in entries:
                handled += 1  # deliverMessage(): a no-op here
                await redis.xack(stream, GROUP, entry_id)
        await asyncio.sleep(0.1)
    return handled / (time.perf_counter() - started)


def _processes(url: str, stream: str, count: int) -> float:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.consumers", "--worker", url, stream, f"c{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    total, longest = 0, 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        handled, seconds = out.split()
        total += int(handled)
        longest = max(longest, float(seconds))
    return total / longest


async def run(entries: int) -> list[tuple[str, float]]:
    with EmbeddedRedis() as server:
        redis = command_client(server.url, 8, 10)
        try:
            await _fill(redis, "seed", 2000)
            seed = await _seed_design(redis, "seed", 3.0)
            await _fill(redis, "one", entries)
            one = await asyncio.to_thread(_processes, server.url, "one", 1)
            await _fill(redis, "three", entries)
            three = await asyncio.to_thread(_processes, server.url, "three", 3)
        finally:
            await redis.aclose()
            await redis.connection_pool.disconnect()
    return [
        ("seed design (COUNT 10, ack one by one, sleep 100 ms)", seed),
        ("StreamConsumer, 1 process, no-op handler", one),
        ("StreamConsumer, 3 processes, one group, no-op handler", three),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consumers")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--worker", nargs=3, metavar=("URL", "STREAM", "NAME"))
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker(*args.worker))
        return
    for label, rate in asyncio.run(run(args.entries)):
        print(f"{rate:>12,.0f} entries/s  {label}")


if __name__ == "__main__":
    main()
