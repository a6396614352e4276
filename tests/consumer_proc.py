"""A consumer process for crash tests: ``python -m tests.consumer_proc URL STREAM NAME BURST``.

Its handler counts each entry exactly once with ApplyOnce (``<stream>:counts`` field
``total``), records every attempt (``attempts``), and prints ``handled N`` every 500 entries.
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial

from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer import ConsumerOptions, Delivery, StreamConsumer
from tokenbridge.store.client import blocking_client, command_client
from tokenbridge.store.once import ApplyOnce


async def main(url: str, stream: str, name: str, burst: bool) -> None:
    redis = command_client(url, 8, 10)
    once = ApplyOnce(redis, 3_600_000)
    counts = f"{{{stream}}}:counts"
    handled = 0

    async def handle(delivery: Delivery) -> None:
        nonlocal handled
        await redis.hincrby(counts, "attempts", 1)
        await once.hincrby(f"{{{stream}}}", delivery.entry_id, {counts: {"total": 1}})
        handled += 1
        if handled % 500 == 0:
            print(f"handled {handled}", flush=True)

    consumer = StreamConsumer(
        redis,
        partial(blocking_client, url, 1000),
        stream,
        "g",
        name,
        handle,
        ConsumerOptions(
            concurrency=50,
            count=100,
            block_ms=200,
            claim_idle_ms=1000,
            heartbeat_s=0.2,
            burst=burst,
        ),
        DeadLetters(redis, f"{stream}:dlq"),
    )
    print("ready", flush=True)
    await consumer.run()
    print(f"done {handled}", flush=True)
    await redis.aclose()
    await redis.connection_pool.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "burst"))
