"""ResumeReads: the batched history reads give, read for read, what ``HGET :meta epoch`` +
``XRANGE :events <start> + COUNT n`` give, on standalone Redis (one multi-stream XREAD per
batch) and on the cluster (an XRANGE each): resume id included, a trimmed resume id, a
missing stream, pages cut at ``count``, one session twice in a batch."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from typing import Any

from tests.servers import redis_client
from tokenbridge.gateway.resume_reads import ResumeReads, just_before
from tokenbridge.store.client import is_cluster
from tokenbridge.wire.keys import Keys


def test_just_before_is_the_greatest_id_below() -> None:
    assert just_before("-") == "0-0"
    assert just_before("1700000000000-3") == "1700000000000-2"
    assert just_before("1700000000000-0") == f"1699999999999-{2**64 - 1}"
    assert just_before("0-1") == "0-0"
    assert just_before("0-0") == "0-0"
    assert just_before("oops") is None


async def _expected(redis: Any, keys: Keys, sid: str, start: str, count: int) -> Any:
    epoch = await redis.hget(keys.meta(sid), "epoch")
    return epoch, await redis.xrange(keys.events(sid), min=start, max="+", count=count)


async def test_batched_reads_match_hget_and_xrange(redis_url: str) -> None:
    keys = Keys(f"rr{secrets.token_hex(3)}")
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        tasks.append(asyncio.get_running_loop().create_task(coro))
        return tasks[-1]

    async with redis_client(redis_url) as redis:
        ids: dict[str, list[str]] = {}
        for n, sid in enumerate(("a", "b", "c", "trimmed")):
            await redis.hset(keys.meta(sid), "epoch", f"e{n}")
            ids[sid] = [
                (await redis.xadd(keys.events(sid), {"n": str(i)})).decode() for i in range(12)
            ]
        await redis.xtrim(
            keys.events("trimmed"), maxlen=5, approximate=False
        )  # exact: its first 7 are gone
        reads = [
            ("a", ids["a"][3], 5),  # a page cut at count: the rest is a follow-up read
            ("a", ids["a"][9], 5),  # the same stream twice in one batch
            ("b", "-", 100),  # from the first entry
            ("b", ids["b"][11], 5),  # the last entry: only itself
            ("c", ids["c"][0].split("-")[0] + "-0", 4),  # an id the stream never had
            ("trimmed", ids["trimmed"][2], 5),  # trimmed: the resume id is not found
            ("missing", "1-1", 5),  # no stream, no epoch
        ]
        reader = ResumeReads(redis, keys, spawn)
        got = await asyncio.gather(*(reader.read(sid, start, count) for sid, start, count in reads))
        await asyncio.gather(*tasks)
        want = [await _expected(redis, keys, sid, start, count) for sid, start, count in reads]
        # A follow-up read (as the connection does after a cut page) gives the rest.
        rest = await reader.read("a", got[0][1][-1][0].decode(), 100)
        assert rest == await _expected(redis, keys, "a", got[0][1][-1][0].decode(), 100)
    assert got == want
    assert [len(page) for _, page in got] == [5, 3, 12, 1, 4, 5, 0]
    assert got[5][1][0][0].decode() != ids["trimmed"][2]  # what tells the gap path
    assert reader.pipelines == 2 and reader.reads == len(reads) + 1
    # standalone: one XREAD per COUNT (5, 100, 4) plus one for "a" named twice, one for the
    # follow-up; cluster: none
    assert reader.xreads == (0 if is_cluster(redis) else 5)


async def test_a_read_fails_at_once_when_its_task_cannot_start(redis_url: str) -> None:
    """A fan-out that is not running (spawn raises): the read fails, and a later read, once
    tasks start again, is served rather than queued behind a task that never ran."""
    keys = Keys(f"rr{secrets.token_hex(3)}")
    running = False

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        if not running:
            raise RuntimeError("fan-out not running")
        return asyncio.get_running_loop().create_task(coro)

    async with redis_client(redis_url) as redis:
        await redis.hset(keys.meta("a"), "epoch", "e1")
        first = (await redis.xadd(keys.events("a"), {"n": "0"})).decode()
        reader = ResumeReads(redis, keys, spawn)
        try:
            await reader.read("a", first, 5)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the read should have failed")
        running = True
        epoch, entries = await asyncio.wait_for(reader.read("a", first, 5), 10)
        assert epoch == b"e1" and [e[0].decode() for e in entries] == [first]
