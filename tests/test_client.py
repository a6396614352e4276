"""The SDK against a real gateway: the sync client streams, resumes after a cut connection and
cancels; the async one too; typed errors for 401/403/404/429. The sync client runs in a thread
(it blocks), the gateway and a cutting TCP proxy in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.servers import Gateway
from tokenbridge import (
    AsyncTokenBridgeClient,
    AuthenticationError,
    GenerationStarted,
    NotFound,
    PermissionDenied,
    RateLimited,
    StreamEvent,
    TokenBridgeClient,
)
from tokenbridge.exceptions import APIConnectionError

KEY = "k" * 40


class CuttingProxy:
    """A TCP proxy to ``port`` that cuts its first ``cuts`` connections once they have carried
    ``after_bytes`` from the server: a dropped SSE stream, mid-generation."""

    def __init__(self, port: int, after_bytes: int = 3000, cuts: int = 1) -> None:
        self.target = port
        self.after_bytes = after_bytes
        self.cuts_left = cuts
        self.cut = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> CuttingProxy:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        upstream: asyncio.Task[None] | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            cutting = self.cuts_left > 0
            self.cuts_left -= 1
            upstream = asyncio.create_task(self._pipe(reader, up_writer, None))
            await self._pipe(up_reader, writer, self.after_bytes if cutting else None)
        finally:
            if upstream is not None:
                upstream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upstream
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(ConnectionError):
                        await w.wait_closed()
            self.tasks.discard(task)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: int | None
    ) -> None:
        carried = 0
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
                carried += len(data)
                if limit is not None and carried >= limit:
                    self.cut += 1
                    return


def assert_whole(events: list[StreamEvent], tokens: int) -> None:
    """start, every token, end: seq 0..n+1 once each, in order."""
    assert [e.data["seq"] for e in events] == list(range(tokens + 2))
    assert events[0].event == "start" and events[-1].event == "end"


def sync_stream_through(url: str, tokens: int) -> tuple[list[StreamEvent], int]:
    with TokenBridgeClient(url) as tb:
        started = tb.start_generation("resume me", params={"max_tokens": tokens, "rate": 400})
        return list(tb.stream(started)), tb.reconnects


async def test_sync_client_streams_and_resumes_after_a_cut(settings_factory: Any) -> None:
    async with Gateway(settings_factory()) as gw, CuttingProxy(gw.port) as proxy:
        async with asyncio.timeout(30):
            events, reconnects = await asyncio.to_thread(sync_stream_through, proxy.url, 200)
    assert proxy.cut == 1 and reconnects >= 1
    assert_whole(events, 200)


async def test_async_client_streams_and_resumes_after_a_cut(settings_factory: Any) -> None:
    async with (
        Gateway(settings_factory()) as gw,
        CuttingProxy(gw.port) as proxy,
        AsyncTokenBridgeClient(proxy.url) as tb,
        asyncio.timeout(30),
    ):
        started = await tb.start_generation("again", params={"max_tokens": 200, "rate": 400})
        events = [event async for event in tb.stream(started)]
    assert proxy.cut == 1 and tb.reconnects >= 1
    assert_whole(events, 200)


def sync_cancel(url: str) -> tuple[list[StreamEvent], bool, bool]:
    with TokenBridgeClient(url) as tb:
        started = tb.start_generation("long", params={"max_tokens": 10_000, "rate": 20})
        events: list[StreamEvent] = []
        first = second = False
        for event in tb.stream(started):
            events.append(event)
            if event.event == "token" and not first:
                first = tb.cancel(started)
        second = tb.cancel(started.generation_id)
        return events, first, second


async def test_sync_client_cancels(settings_factory: Any) -> None:
    async with Gateway(settings_factory()) as gw, asyncio.timeout(30):
        events, first, second = await asyncio.to_thread(sync_cancel, gw.url)
    assert first is True and second is False  # the second: it had already ended
    assert events[-1].event == "end" and events[-1].data["reason"] == "cancelled"
    assert events[-1].data["tokens"] < 10_000


async def test_async_client_cancels(settings_factory: Any) -> None:
    async with Gateway(settings_factory()) as gw, AsyncTokenBridgeClient(gw.url) as tb:
        started = await tb.start_generation("long", params={"max_tokens": 10_000, "rate": 20})
        async with asyncio.timeout(30), contextlib.aclosing(tb.stream(started)) as events:
            async for event in events:
                if event.event == "token":
                    assert await tb.cancel(started)
                last = event
    assert last.event == "end" and last.data["reason"] == "cancelled"


def typed_errors(url: str) -> dict[str, Exception]:
    seen: dict[str, Exception] = {}
    with TokenBridgeClient(url) as anonymous:
        try:
            anonymous.start_generation("hi")
        except AuthenticationError as exc:
            seen["401"] = exc
    with TokenBridgeClient(url, api_key=KEY) as tb:
        a = tb.start_generation("a", params={"max_tokens": 1})
        b_session = "s" + "b" * 20
        url_b = a.events_url.replace(a.session_id, b_session)
        try:
            list(tb.stream(GenerationStarted(b_session, "g", url_b)))
        except PermissionDenied as exc:
            seen["403"] = exc
        try:
            tb.cancel("g" + "0" * 20)
        except NotFound as exc:
            seen["404"] = exc
        try:
            tb.start_generation("b", params={"max_tokens": 1})
        except RateLimited as exc:
            seen["429"] = exc
    return seen


async def test_typed_errors(settings_factory: Any) -> None:
    settings = settings_factory(
        auth_disabled=False, api_keys=[KEY], rate_limit_generations="1/minute"
    )
    async with Gateway(settings) as gw, asyncio.timeout(30):
        seen = await asyncio.to_thread(typed_errors, gw.url)
    assert set(seen) == {"401", "403", "404", "429"}, seen
    assert [getattr(seen[k], "status_code", None) for k in sorted(seen)] == [401, 403, 404, 429]
    limited = seen["429"]
    assert isinstance(limited, RateLimited) and limited.retry_after is not None
    assert limited.retry_after > 0


async def test_no_gateway_is_a_connection_error() -> None:
    from tests.servers import free_port

    def start() -> None:
        with TokenBridgeClient(f"http://127.0.0.1:{free_port()}") as tb:
            tb.start_generation("x")

    with pytest.raises(APIConnectionError, match="cannot reach tokenbridge"):
        await asyncio.to_thread(start)
