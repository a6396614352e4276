"""ClientConnection: bounded buffer, slow-client cut, seam filtering; SSE heartbeats."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.servers import Gateway
from tests.sse_client import read_events
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.frames import Batch, Frame
from tokenbridge.wire.events import Event


def batch(*ids: str) -> Batch:
    return Batch([Frame(i, "ep", Event("token", "g_1", n, text="x")) for n, i in enumerate(ids)])


async def test_full_buffer_cuts_the_connection_as_slow_client() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=3)
    conn.deliver(batch("1-0", "2-0"))
    conn.deliver(batch("3-0", "4-0"))  # 4 > 3: cut, buffer dropped
    assert conn.closed_reason == "slow_client"
    assert conn.buffered_events == 0
    assert await conn.next_batches(1.0) is None


async def test_next_batches_returns_everything_queued_then_times_out_empty() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=100)
    conn.deliver(batch("1-0"))
    conn.deliver(batch("2-0", "3-0"))
    got = await conn.next_batches(1.0)
    assert got is not None and [len(b) for b in got] == [1, 2]
    assert await conn.next_batches(0.01) == []


async def test_seam_cuts_what_the_client_already_has() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=100)
    conn.mark_sent(batch("1-0", "2-0"), 0)
    unsent = conn.unsent(batch("2-0", "3-0", "10-1"))
    assert [f.entry_id for f in unsent.frames] == ["3-0", "10-1"]
    assert conn.unsent(batch("1-5")).frames == []


async def test_idle_sse_stream_gets_heartbeat_comments(settings_factory: Any) -> None:
    settings = settings_factory(connection_heartbeat_s=0.05)
    two_pings = asyncio.Event()

    class Comments(list[str]):
        def append(self, item: str) -> None:
            super().append(item)
            if self.count("ping") >= 2:
                two_pings.set()

    comments = Comments()
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:

        async def read() -> None:
            async for _ in read_events(http, "/v1/sessions/quiet/events", raw_comments=comments):
                pass

        reader = asyncio.create_task(read())
        async with asyncio.timeout(10):
            await two_pings.wait()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert comments.count("ping") >= 2


def big_batch(entry_id: str, nbytes: int) -> Batch:
    return Batch([Frame(entry_id, "ep", Event("token", "g_1", 1, text="x" * nbytes))])


async def test_byte_budget_cuts_a_client_holding_too_many_bytes() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=1000, max_buffered_bytes=10_000)
    conn.deliver(big_batch("1-0", 50_000))  # alone it always fits: a client that keeps up
    assert conn.closed_reason is None and conn.buffered_bytes > 10_000
    taken = await conn.next_batches(1.0)  # now being written: still held for the client
    assert taken is not None and conn.buffered_bytes > 10_000
    conn.deliver(big_batch("2-0", 10))
    assert conn.closed_reason == "slow_client"


async def test_byte_budget_counts_what_was_written_as_gone() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=1000, max_buffered_bytes=10_000)
    for n in range(10):
        conn.deliver(big_batch(f"{n}-0", 5_000))
        assert await conn.next_batches(1.0)
        assert await conn.write(asyncio.sleep(0)) is None  # the write returned
    assert conn.closed_reason is None and conn.buffered_bytes == 0
