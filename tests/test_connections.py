"""ConnectionManager: slow-client cut and resume, connection limits, idle timeout, stats."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.servers import Gateway
from tests.sse_client import SSEEvent, read_events
from tests.test_resume import assert_complete
from tests.test_token_path import collect_until_end, start
from tests.test_websocket_cancel import ws_url
from tokenbridge.gateway import pump

# -- raw HTTP/SSE helpers (real sockets, no client library in between) -----------------------


def dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP/1.1 response (status line and headers included in ``raw``);
    a last chunk cut short is kept as far as it goes."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = bytearray()
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return bytes(body)


def parse_sse(body: bytes) -> tuple[list[SSEEvent], list[str]]:
    """Events and comments of an SSE body (whole messages only)."""
    events: list[SSEEvent] = []
    comments: list[str] = []
    for block in body.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            data = json.loads(fields["data"])
            events.append(SSEEvent(fields.get("event", "message"), data, fields.get("id")))
    return events, comments


class StalledClient:
    """An SSE request on a raw socket with a small receive buffer that, once subscribed (its
    ``retry:`` preamble arrived), reads nothing until told to: the kernel buffers on both
    sides fill up and the server's writes stall."""

    def __init__(self, port: int, path: str, receive_buffer_bytes: int = 4096) -> None:
        self.port = port
        self.path = path
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        self.sock.setblocking(False)
        self.received = bytearray()

    async def __aenter__(self) -> StalledClient:
        loop = asyncio.get_running_loop()
        try:  # __aexit__ does not run if this fails: close the socket here then
            await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
            request = f"GET {self.path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
            await loop.sock_sendall(self.sock, request.encode())
            while b"retry:" not in self.received:
                chunk = await loop.sock_recv(self.sock, 1024)
                assert chunk, f"closed before the preamble: {bytes(self.received)!r}"
                self.received += chunk
        except BaseException:
            self.sock.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def read_until_closed(self) -> tuple[list[SSEEvent], list[str]]:
        """Read everything until the server closes: the events and comments of the response."""
        loop = asyncio.get_running_loop()
        while chunk := await loop.sock_recv(self.sock, 1 << 16):
            self.received += chunk
        return parse_sse(dechunk(bytes(self.received)))


# -- slow client --------------------------------------------------------------------------


async def test_one_stalled_client_is_cut_as_slow_and_resumes_while_fifty_get_every_token(
    settings_factory: Any,
) -> None:
    # Buffers sized so that the stalled client overflows halfway through the answer, while a
    # reader that merely lags (the 50 share this event loop with the gateway) never does.
    settings = settings_factory(connection_max_buffered_events=1000, fanout_batch_events=100)
    tokens = 3000
    session = "slow-" + secrets.token_hex(4)
    path = f"/v1/sessions/{session}/events"
    all_in = asyncio.Event()
    subscribed = 0

    async def reader(http: httpx.AsyncClient) -> list[SSEEvent]:
        """Read the stream, fast enough, until the generation's end."""
        nonlocal subscribed
        body = bytearray()
        async with http.stream("GET", path) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_bytes():
                if not body:  # the preamble: subscribed
                    subscribed += 1
                    if subscribed == 50:
                        all_in.set()
                body += chunk
                if b"\nevent: end\n" in body[-(len(chunk) + 16) :]:
                    break
        return parse_sse(bytes(body))[0]

    limits = httpx.Limits(max_connections=None)
    async with (
        Gateway(settings, send_buffer_bytes=16_384) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30, limits=limits) as http,
        StalledClient(gw.port, path) as stalled,
    ):
        async with asyncio.timeout(60):
            readers = [asyncio.create_task(reader(http)) for _ in range(50)]
            await all_in.wait()
            started = await start(
                http, session_id=session, params={"max_tokens": tokens, "rate": 2000}
            )
            answers = await asyncio.gather(*readers)
        gen = started["generation_id"]
        for events in answers:
            assert_complete(events, gen, tokens)
        # Every batch reached every connection at once, the `end` the 50 got included: the
        # stalled one had overflowed by then.
        cut = [
            c
            for c in gw.app.state.connections.connections_for_session(session)
            if c.closed_reason == "slow_client"
        ]
        assert len(cut) == 1
        async with asyncio.timeout(30):
            first, comments = await stalled.read_until_closed()
            assert comments[-1] == "closed slow_client"
            assert first and first[-1].event == "token"
            rest = await collect_until_end(http, path, gen, last_event_id=first[-1].id)
    assert rest[0].data["seq"] == first[-1].data["seq"] + 1
    assert_complete(first + rest, gen, tokens)


# -- limits -------------------------------------------------------------------------------


async def _refused_ws(gateway_url: str, session: str) -> tuple[int | None, str | None]:
    async with connect(ws_url(gateway_url, session)) as ws:
        await ws.wait_closed()
    return ws.close_code, ws.close_reason


async def test_connections_over_a_session_or_address_limit_are_refused(
    settings_factory: Any,
) -> None:
    settings = settings_factory(
        limits_max_connections_per_session=2, limits_max_connections_per_address=3
    )
    async with (
        Gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        asyncio.timeout(30),
    ):
        streams = []
        try:
            for session in ("lim-a", "lim-a", "lim-b"):  # 2 on lim-a, 3 from this address
                stream = http.stream("GET", f"/v1/sessions/{session}/events")
                response = await stream.__aenter__()
                streams.append(stream)
                assert response.status_code == 200
            third = await http.get("/v1/sessions/lim-a/events")  # a 3rd one on lim-a
            assert third.status_code == 429
            error = third.json()["error"]
            assert error["code"] == "too_many_session_connections"
            assert "lim-a" in error["message"]
            assert "TOKENBRIDGE_LIMITS_MAX_CONNECTIONS_PER_SESSION" in error["message"]
            code, reason = await _refused_ws(gw.url, "lim-a")
            assert code == 1013 and reason and reason.startswith("too_many_session_connections")

            fourth = await http.get("/v1/sessions/lim-c/events")  # a 4th one from 127.0.0.1
            assert fourth.status_code == 429
            assert fourth.json()["error"]["code"] == "too_many_address_connections"
            code, reason = await _refused_ws(gw.url, "lim-c")
            assert code == 1013 and reason and reason.startswith("too_many_address_connections")

            stats = (await http.get("/v1/status")).json()["connections"]
            assert stats["total"] == 3 and stats["sessions"] == 2
            assert stats["by_transport"] == {"sse": 3}
            assert stats["refused"] == {
                "too_many_session_connections": 2,
                "too_many_address_connections": 2,
            }
            assert stats["limits"]["max_connections_per_session"] == 2
            assert stats["limits"]["max_connections_per_address"] == 3
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)


async def test_connections_over_the_process_limit_are_refused(settings_factory: Any) -> None:
    settings = settings_factory(limits_max_connections=1)
    async with (
        Gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        asyncio.timeout(30),
        http.stream("GET", "/v1/sessions/one/events") as first,
    ):
        assert first.status_code == 200
        second = await http.get("/v1/sessions/two/events")
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "too_many_connections"
        assert second.headers["retry-after"] == "1"
        code, reason = await _refused_ws(gw.url, "two")
        assert code == 1013 and reason and reason.startswith("too_many_connections")


async def test_websocket_message_over_the_size_limit_closes_1009(settings_factory: Any) -> None:
    settings = settings_factory(limits_max_websocket_message_bytes=256)
    async with Gateway(settings) as gw, asyncio.timeout(30):
        async with connect(ws_url(gw.url, "big")) as ws:
            await ws.send(json.dumps({"type": "ping", "pad": "x" * 300}))
            await ws.wait_closed()
        assert ws.close_code == 1009 and ws.close_reason == "message_too_big"


# -- idle timeout -------------------------------------------------------------------------


async def test_idle_connections_are_closed_with_reason_idle(settings_factory: Any) -> None:
    settings = settings_factory(connection_idle_timeout_s=0.3, connection_heartbeat_s=0.05)
    async with (
        Gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        asyncio.timeout(30),
    ):
        # A token every 25 ms keeps a connection busy: it gets the whole answer, then goes
        # idle and is closed (heartbeats are not events).
        started = await start(http, params={"max_tokens": 20, "rate": 40})
        comments: list[str] = []
        events = [e async for e in read_events(http, started["events_url"], raw_comments=comments)]
        assert_complete(events, started["generation_id"], 20)
        assert comments[-1] == "closed idle"
        assert "ping" in comments
        async with connect(ws_url(gw.url, "quiet")) as ws:
            await ws.wait_closed()
        assert ws.close_code == 1000 and ws.close_reason == "idle"
        stats = (await http.get("/v1/status")).json()["connections"]
    assert stats["closed"]["idle"] == 2
    assert stats["limits"]["idle_timeout_s"] == 0.3


async def test_a_client_that_reads_nothing_is_dropped_after_its_close(
    settings_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain reaches a connection whose task waits for its socket to drain (uvicorn's flow
    control): the write is abandoned, and a close the client does not read in
    CLOSING_TIMEOUT_S drops the connection (it would otherwise hold its task forever)."""
    monkeypatch.setattr(pump, "CLOSING_TIMEOUT_S", 0.2)
    # Small reads: many small writes, so that one of them waits for the socket to drain.
    settings = settings_factory(fanout_batch_events=50)
    session = "stuck-" + secrets.token_hex(4)
    path = f"/v1/sessions/{session}/events"
    async with (
        Gateway(settings, send_buffer_bytes=8192) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        StalledClient(gw.port, path) as stalled,
        asyncio.timeout(30),
    ):
        started = await start(http, session_id=session, params={"max_tokens": 2000, "rate": 0})
        await collect_until_end(http, path, started["generation_id"])
        manager = gw.app.state.connections
        # Its writes stalled before the end: the rest is still queued for it.
        (conn,) = [c for c in manager.connections_for_session(session) if c.events_sent < 2002]
        ended = asyncio.Event()
        fanout = gw.state.fanout
        unsubscribe = fanout.unsubscribe

        def unsubscribe_and_tell(c: Any) -> None:  # the end of the connection's task
            unsubscribe(c)
            if c is conn:
                ended.set()

        monkeypatch.setattr(fanout, "unsubscribe", unsubscribe_and_tell)
        gw.app.state.drain()
        await ended.wait()
        assert conn.closed_reason == "shutdown"
        assert conn not in manager.connections_for_session(session)
        events, comments = await stalled.read_until_closed()
    assert "closed shutdown" not in comments
    assert [e.data["seq"] for e in events] == list(range(len(events)))
    assert len(events) == conn.events_sent  # the abandoned write sent nothing
