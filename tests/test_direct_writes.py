"""Direct writes: a parked connection's batches go to its direct writer, in order; a close
aborts a write without a timeout object and without leaking the cancellation; uvicorn's
protocol exposes the response body (gateway/direct_http.py) and reports a client that left."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
import uvicorn

from tests.servers import _Server, free_port
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.direct_http import DirectBody, LightEvent
from tokenbridge.gateway.frames import Batch, Frame
from tokenbridge.gateway.websocket import uvicorn_options
from tokenbridge.settings import Settings
from tokenbridge.wire.events import Event


def batch(*ids: str) -> Batch:
    return Batch([Frame(i, "ep", Event("token", "g_1", n, text="x")) for n, i in enumerate(ids)])


async def test_parked_connection_writes_through_its_direct_writer_in_order() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=100)
    written: list[list[str]] = []
    accept = True

    def direct(batches: list[Batch]) -> bool:
        if accept:
            written.append([f.entry_id for b in batches for f in b.frames])
        return accept

    waiting = asyncio.create_task(conn.next_batches(30.0, direct))
    await asyncio.sleep(0)  # let the task park (its first step), not a timing wait
    conn.deliver(batch("1-0"))
    conn.deliver(batch("2-0"))  # same loop iteration: one write for both
    await asyncio.sleep(0)  # the loop's flush callback runs
    assert written == [["1-0", "2-0"]] and conn.buffered_events == 0
    assert not waiting.done()
    accept = False  # e.g. flow control paused the transport: the task wakes and writes
    conn.deliver(batch("3-0"))
    got = await asyncio.wait_for(waiting, 10)
    assert written == [["1-0", "2-0"]]
    assert got is not None and [f.entry_id for b in got for f in b.frames] == ["3-0"]
    conn.deliver(batch("4-0"))  # not parked: queued for the task
    assert conn.buffered_events == 1


async def test_close_aborts_a_stuck_write_and_the_task_goes_on() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=100)
    stuck: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def serve() -> tuple[int | None, str]:
        result = await conn.write(stuck)
        await asyncio.sleep(0)  # no cancellation left over for the next await
        return result, "went on"

    task = asyncio.create_task(serve())
    await asyncio.sleep(0)
    conn.close("slow_client")
    assert await asyncio.wait_for(task, 10) == (None, "went on")


async def test_an_outside_cancel_during_a_write_still_cancels() -> None:
    conn = ClientConnection("s", "sse", max_buffered_events=100)
    stuck: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(conn.write(stuck))
    await asyncio.sleep(0)
    task.cancel()
    conn.close("shutdown")  # both: ours is taken back, the outside one stays
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_uvicorn_protocol_gives_the_body_and_reports_the_client_leaving() -> None:
    opened: list[DirectBody | None] = []
    lost = asyncio.Event()

    class _Lost:
        def close(self, reason: str) -> None:
            assert reason == "client_gone"
            lost.set()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        body = DirectBody.open(scope)
        opened.append(body)
        if body is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        assert body.ready()
        body.on_lost(_Lost())
        body.write(b"data: one\n\n")
        body.write(b"data: two\n\n")
        async with asyncio.timeout(10):
            await lost.wait()
        body.on_lost(None)

    port = free_port()
    options = uvicorn_options(Settings(redis_url="redis://127.0.0.1:1"))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, **options)
    server = _Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            await server.ready.wait()
        async with httpx.AsyncClient() as http:
            url = f"http://127.0.0.1:{port}/"
            async with http.stream("GET", url) as response:
                assert response.headers["transfer-encoding"] == "chunked"
                received = b""
                async for part in response.aiter_bytes():
                    received += part
                    if received.count(b"\n\n") == 2:
                        break
        assert received == b"data: one\n\ndata: two\n\n"  # chunk framing undone by httpx
        async with asyncio.timeout(10):
            await lost.wait()  # the client closed: the callback fired, no task in receive()
        assert opened and opened[0] is not None
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 10)


def test_other_servers_fall_back_to_asgi_sends() -> None:
    assert DirectBody.open({"type": "http", "method": "GET"}) is None
    assert DirectBody.open({"type": "http", "method": "GET", "extensions": {}}) is None


async def test_light_event_wakes_every_waiter_and_a_cancelled_one_spoils_none() -> None:
    event = LightEvent()
    first = asyncio.create_task(event.wait())
    second = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    third = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    event.set()
    assert await asyncio.wait_for(second, 10) and await asyncio.wait_for(third, 10)
    assert first.cancelled() and event.is_set()
    event.clear()
    assert not event.is_set()


def test_text_frames_carry_their_length_in_the_three_forms() -> None:
    from tokenbridge.gateway.direct_ws import text_frame

    assert text_frame("hi") == b"\x81\x02hi"
    assert text_frame("x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame("é" * 40000)[:10] == b"\x81\x7f" + (80000).to_bytes(8, "big")


async def test_wake_clock_wakes_each_waiter_at_its_deadline_in_order() -> None:
    from tokenbridge.gateway.wake_clock import wake_at

    loop = asyncio.get_running_loop()
    woken: list[str] = []
    waiters = {}
    for name, delay in (("late", 0.05), ("early", 0.01), ("never", 30.0)):
        waiter: asyncio.Future[None] = loop.create_future()
        waiter.add_done_callback(lambda _, n=name: woken.append(n))
        wake_at(loop, delay, waiter)
        waiters[name] = waiter
    for _ in range(200):  # woken early: their entries are dropped, not fired
        early: asyncio.Future[None] = loop.create_future()
        wake_at(loop, 0.02, early)
        early.set_result(None)
    await asyncio.wait_for(waiters["late"], 10)
    assert woken == ["early", "late"]
    waiters["never"].cancel()


async def test_clock_calls_fire_in_order_unless_cancelled_and_a_failing_one_spoils_none() -> None:
    from tokenbridge.gateway.wake_clock import call_later

    loop = asyncio.get_running_loop()
    called: list[str] = []
    done = asyncio.Event()

    def fail() -> None:
        raise RuntimeError("a callback's bug")

    call_later(loop, 0.03, lambda: (called.append("late"), done.set()))
    call_later(loop, 0.01, lambda: called.append("early"))
    call_later(loop, 0.02, fail)
    call_later(loop, 0.015, lambda: called.append("cancelled")).cancel()
    async with asyncio.timeout(10):
        await done.wait()
    assert called == ["early", "late"]


async def test_websocket_pings_on_the_clock_and_works_without_its_handshake_state() -> None:
    from websockets.asyncio.client import connect

    from tokenbridge.gateway.direct_http import EXTENSION
    from tokenbridge.gateway.direct_ws import _HANDSHAKEN, DirectFrames

    answered: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        protocol = scope["extensions"][EXTENSION]
        assert protocol.conn.handshake is _HANDSHAKEN  # dropped once accepted
        ponged = asyncio.Event()
        handle_pong = protocol.handle_pong

        def pong(event: Any) -> None:
            handle_pong(event)
            ponged.set()

        protocol.handle_pong = pong
        async with asyncio.timeout(10):
            await ponged.wait()  # a ping went out on the clock, and its pong came back
        assert protocol.last_ping_rtt > 0
        frames = DirectFrames.open(scope)
        assert frames is not None and frames.ready()
        frames.write("hello")
        message = await receive()  # the client's reply is still parsed
        answered.append(message.get("text", ""))
        await send({"type": "websocket.close", "code": 1000})

    port = free_port()
    options = uvicorn_options(Settings(redis_url="redis://127.0.0.1:1"))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, ws_ping_interval=0.05, **options
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            await server.ready.wait()
            async with connect(f"ws://127.0.0.1:{port}/", ping_interval=None) as ws:
                assert await ws.recv() == "hello"
                await ws.send("thanks")
                with contextlib.suppress(Exception):
                    await ws.recv()  # the close
        assert answered == ["thanks"]
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 10)


async def test_one_failing_direct_writer_does_not_leave_the_others_unflushed() -> None:
    """The loop's flush list runs every parked connection's writer even when one raises; the
    failing one is closed (its client resumes from what it received)."""
    broken = ClientConnection("s1", "sse", max_buffered_events=100)
    healthy = ClientConnection("s2", "sse", max_buffered_events=100)
    written: list[str] = []

    def explode(batches: list[Batch]) -> bool:
        raise RuntimeError("a bug in a writer")

    def direct(batches: list[Batch]) -> bool:
        written.extend(f.entry_id for b in batches for f in b.frames)
        return True

    tasks = [
        asyncio.create_task(broken.next_batches(30.0, explode)),
        asyncio.create_task(healthy.next_batches(30.0, direct)),
    ]
    await asyncio.sleep(0)  # let both tasks park (their first step), not a timing wait
    broken.deliver(batch("1-0"))  # first in the flush list
    healthy.deliver(batch("2-0"))
    await asyncio.sleep(0)  # the loop's flush callback runs
    assert written == ["2-0"]
    assert broken.closed_reason == "internal_error"
    healthy.deliver(batch("3-0"))  # its flush flag was reset: the next one is written too
    await asyncio.sleep(0)
    assert written == ["2-0", "3-0"]
    healthy.close("done")
    for task in tasks:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
