"""Consumer groups: at least once, reclaim, dead letters, restarts, clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_exc

from tests.conftest import BOTH
from tests.servers import RedisServer, redis_client
from tokenbridge.consumers.dead_letters import DeadLetters
from tokenbridge.consumers.stream_consumer import ConsumerOptions, Delivery, StreamConsumer
from tokenbridge.consumers.stream_consumer_service import StreamConsumerService
from tokenbridge.exceptions import InvalidEntry
from tokenbridge.store.client import blocking_client, command_client


@pytest.fixture
async def redis(backend_url: str) -> AsyncIterator[aioredis.Redis]:
    """Standalone Redis, or the cluster for the tests marked ``BOTH``."""
    async with redis_client(backend_url) as client:
        yield client


@pytest.fixture
def stream() -> str:
    return "c" + secrets.token_hex(4)


async def produce(redis: aioredis.Redis, stream: str, n: int, **fields: Any) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + 1000)):
                pipe.xadd(stream, {"n": i, **fields})
            ids += [i.decode() for i in await pipe.execute()]
    return ids


def consumer(
    redis: aioredis.Redis, url: str, stream: str, name: str, handler: Any, **options: Any
) -> StreamConsumer:
    defaults: dict[str, Any] = {
        "concurrency": 64,
        "count": 200,
        "block_ms": 200,
        "claim_idle_ms": 5000,  # no takeovers unless a test asks (a loaded CI box is slow)
        "heartbeat_s": 0.05,
    }
    defaults.update(options)
    dead_letters = defaults.pop("dead_letters", None)
    return StreamConsumer(
        redis, partial(blocking_client, url, 1000), stream, "g", name, handler,
        ConsumerOptions(**defaults), dead_letters,
    )  # fmt: skip


async def wait_for_length(redis: aioredis.Redis, key: str, length: int) -> None:
    """Block on the stream until it has ``length`` entries (XREAD BLOCK, no polling)."""
    last = "0-0"
    seen = 0
    while seen < length:
        reply: Any = await redis.xread({key: last}, block=1000)
        for _, entries in reply or ():
            seen += len(entries)
            last = entries[-1][0]


@BOTH
async def test_ten_thousand_entries_three_consumers_all_acked(
    redis: aioredis.Redis, backend_url: str, stream: str
) -> None:
    ids = await produce(redis, stream, 10_000)
    seen: Counter[str] = Counter()

    async def handle(delivery: Delivery) -> None:
        seen[delivery.entry_id] += 1

    consumers = [
        consumer(redis, backend_url, stream, f"c{i}", handle, burst=True) for i in range(3)
    ]
    async with asyncio.timeout(60):
        await asyncio.gather(*(c.run() for c in consumers))
    assert set(seen) == set(ids)
    assert sum(c.stats.acked for c in consumers) == 10_000
    assert all(c.stats.read > 0 for c in consumers)  # the group split the work
    pending: Any = await redis.xpending(stream, "g")
    assert pending["pending"] == 0


@BOTH
async def test_killed_worker_process_entries_reclaimed_exactly_once(
    redis: aioredis.Redis, backend_url: str, stream: str
) -> None:
    await produce(redis, stream, 10_000)
    root = Path(__file__).parent.parent
    argv = [sys.executable, "-m", "tests.consumer_proc", backend_url, stream]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    first = subprocess.Popen([*argv, "a", "forever"], stdout=subprocess.PIPE, cwd=root, env=env)
    assert first.stdout is not None
    async with asyncio.timeout(60):
        while True:  # read its progress lines until about half is done
            line = await asyncio.to_thread(first.stdout.readline)
            assert line, "consumer process died"
            if line.startswith(b"handled") and int(line.split()[1]) >= 5000:
                break
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    first.stdout.close()
    pending_after_kill: Any = await redis.xpending(stream, "g")
    second = subprocess.Popen([*argv, "b", "burst"], stdout=subprocess.PIPE, cwd=root, env=env)
    try:
        out, _ = await asyncio.wait_for(asyncio.to_thread(second.communicate), 90)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(10)
    assert b"done" in out
    counts: Any = await redis.hgetall(f"{{{stream}}}:counts")
    assert int(counts[b"total"]) == 10_000  # exact, although some entries ran twice
    assert int(counts[b"attempts"]) >= 10_000
    pending: Any = await redis.xpending(stream, "g")
    assert pending["pending"] == 0
    assert pending_after_kill["pending"] > 0  # the kill did leave work behind


@BOTH
async def test_always_failing_entry_is_dead_lettered_then_replayed(
    redis: aioredis.Redis, backend_url: str, stream: str
) -> None:
    ids = await produce(redis, stream, 50)
    poison = ids[17]
    healed = False
    done: set[str] = set()
    replayed_done = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        if delivery.entry_id == poison or (delivery.fields[b"n"] == b"17" and not healed):
            raise RuntimeError("cannot handle 17")
        done.add(delivery.fields[b"n"].decode())
        if "17" in done:
            replayed_done.set()

    dlq = DeadLetters(redis, f"{stream}:dlq")
    c = consumer(
        redis,
        backend_url,
        stream,
        "c",
        handle,
        max_deliveries=3,
        dead_letters=dlq,
        claim_idle_ms=100,
    )
    async with asyncio.TaskGroup() as group:
        group.create_task(c.run())
        async with asyncio.timeout(30):
            await wait_for_length(redis, dlq.key, 1)
            [letter] = await dlq.letters()
            assert letter.entry_id == poison and letter.deliveries == 3
            assert "cannot handle 17" in letter.error and letter.stream == stream
            assert len(done) == 49
            healed = True
            assert await dlq.replay() == 1
            await replayed_done.wait()  # handled by the running consumer
        c.stop()
    assert await dlq.count() == 0
    assert c.stats.dead_lettered == 1


async def test_undecodable_entry_goes_to_dead_letters_and_loop_goes_on(
    redis: aioredis.Redis, redis_server: RedisServer, stream: str
) -> None:
    await redis.xadd(stream, {"data": json.dumps({"ok": 1})})
    await redis.xadd(stream, {"data": b"{not json\xff"})
    await redis.xadd(stream, {"other": "missing data"})
    await redis.xadd(stream, {"data": json.dumps({"ok": 2})})
    good: list[int] = []

    async def handle(delivery: Delivery) -> None:
        try:
            good.append(json.loads(delivery.fields[b"data"])["ok"])
        except (KeyError, ValueError) as exc:
            raise InvalidEntry(f"bad entry: {exc!r}") from None

    dlq = DeadLetters(redis, f"{stream}:dlq")
    c = consumer(redis, redis_server.url, stream, "c", handle, dead_letters=dlq, burst=True)
    async with asyncio.timeout(30):
        await c.run()
    assert good == [1, 2]
    letters = await dlq.letters()
    assert [letter.error.startswith("invalid entry") for letter in letters] == [True, True]
    assert letters[0].fields[b"data"] == b"{not json\xff"  # bytes survive the round trip
    assert await dlq.purge() == 2


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    with RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        yield server


async def test_consumer_survives_a_redis_restart(durable_redis: RedisServer, stream: str) -> None:
    client = command_client(durable_redis.url, 8, 10)  # retries once on a dead connection
    seen: set[str] = set()
    all_seen = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        seen.add(delivery.fields[b"n"].decode() + delivery.fields[b"phase"].decode())
        if len(seen) == 200:
            all_seen.set()

    async with client:
        c = consumer(client, durable_redis.url, stream, "c", handle)
        async with asyncio.TaskGroup() as group:
            group.create_task(c.run())
            await produce(client, stream, 100, phase="a")
            await asyncio.to_thread(durable_redis.restart, True)
            for attempt in range(5):  # pooled connections died with the server: retry
                try:
                    await produce(client, stream, 100, phase="b")
                    break
                except redis_exc.ConnectionError:
                    if attempt == 4:
                        raise
            async with asyncio.timeout(60):
                await all_seen.wait()
            c.stop()
        pending: Any = await client.xpending(stream, "g")
        await client.connection_pool.disconnect()
    assert pending["pending"] == 0
    assert len(seen) == 200


async def test_a_stop_after_redis_lost_the_group_ends_cleanly(
    redis: aioredis.Redis, redis_server: RedisServer, stream: str
) -> None:
    """A clean stop forgets the consumer's own name; if Redis lost the group meanwhile (a
    restart without data) that is ``NOGROUP``: nothing to forget, not a failed shutdown."""

    async def handle(delivery: Delivery) -> None:
        return None

    c = consumer(redis, redis_server.url, stream, "c", handle)
    await c.reclaimer.forget_self()  # no stream, no group: must not raise
    await redis.xgroup_create(stream, "g", id="0", mkstream=True)
    await redis.xgroup_createconsumer(stream, "g", "c")
    await c.reclaimer.forget_self()  # held nothing: its name is deleted
    assert await redis.xinfo_consumers(stream, "g") == []


async def test_stop_during_a_batch_acks_only_what_was_handled(
    redis: aioredis.Redis, redis_server: RedisServer, stream: str
) -> None:
    await produce(redis, stream, 20)
    handled: set[str] = set()
    started = asyncio.Event()
    ten_handled = asyncio.Event()
    release = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        if int(delivery.fields[b"n"]) % 2:
            started.set()
            await release.wait()  # never released: these are still running at stop
        handled.add(delivery.entry_id)
        if len(handled) == 10:
            ten_handled.set()

    service = StreamConsumerService(redis, partial(blocking_client, redis_server.url, 1000))
    async with service:
        service.start_consumer(
            stream, "g", "c", handle, ConsumerOptions(block_ms=200, concurrency=64)
        )
        async with asyncio.timeout(10):
            await started.wait()
            await ten_handled.wait()
        service.drain_s = 0.2  # the blocked handlers are cancelled after this
    pending: Any = await redis.xpending_range(stream, "g", "-", "+", 100)
    pending_ids = {row["message_id"].decode() for row in pending}
    assert len(handled) == 10 and len(pending_ids) == 10
    assert not handled & pending_ids  # everything handled was acked, nothing else


async def test_a_cleanly_stopped_consumer_that_holds_nothing_leaves_the_group(
    redis: aioredis.Redis, redis_server: RedisServer, stream: str
) -> None:
    await produce(redis, stream, 5)
    done = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        if delivery.fields[b"n"] == b"4":
            done.set()

    c = consumer(redis, redis_server.url, stream, "leaver", handle)
    async with asyncio.TaskGroup() as group:
        group.create_task(c.run())
        async with asyncio.timeout(10):
            await done.wait()
        c.stop()
    names = [row["name"] for row in await redis.xinfo_consumers(stream, "g")]
    assert b"leaver" not in names and "leaver" not in names
