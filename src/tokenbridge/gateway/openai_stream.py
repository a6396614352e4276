"""Run an encoder over one connection: the OpenAI routes' streamed and collected answers.

:class:`EncodedStreamResponse` is an SSE response whose bytes come from an encoder
(``gateway/encodings/``) fed by the same :func:`~tokenbridge.gateway.pump.pump` as the native
stream: subscribe, resume plan, history, live, heartbeats, close. :func:`collect` runs the pump
with no socket for the non-stream answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from starlette.types import Message, Receive, Scope, Send

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.frames import Batch
from tokenbridge.gateway.pump import pump

__all__ = ["EncodedStreamResponse", "StreamEncoder", "collect"]

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class StreamEncoder(Protocol):
    finished: bool

    def preamble(self) -> bytes | None: ...

    def gap(self, info: dict[str, Any]) -> bytes | None: ...

    def encode(self, batches: list[Batch]) -> bytes | None: ...

    def keepalive(self) -> bytes | None: ...

    def closing(self, reason: str) -> bytes | None: ...


class _Sink:
    """pump's Sink over an encoder; ends the response once the encoder has finished."""

    def __init__(self, conn: ClientConnection, encoder: StreamEncoder, send: Send | None) -> None:
        self.conn = conn
        self.encoder = encoder
        self.send = send
        self.ended = False

    async def _out(self, body: bytes | None) -> int:
        done = self.encoder.finished
        if self.send is not None and (body or done):
            await self.send(
                {"type": "http.response.body", "body": body or b"", "more_body": not done}
            )
        if done:
            # No await after this: the close cannot abort the write above (see
            # ClientConnection.write), and the pump's next wait returns at once.
            self.ended = True
            self.conn.close("done")
        return len(body or b"")

    async def preamble(self, gap: dict[str, Any] | None) -> None:
        body = self.encoder.preamble() or b""
        if gap is not None:
            body += self.encoder.gap(gap) or b""
        await self._out(body)

    async def write(self, batches: list[Batch]) -> int:
        return await self._out(self.encoder.encode(batches))

    async def heartbeat(self) -> None:
        await self._out(self.encoder.keepalive())

    async def closing(self, reason: str) -> None:
        if self.ended or self.send is None:
            return
        body = self.encoder.closing(reason) or b""
        with contextlib.suppress(OSError):
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
        self.ended = True


async def collect(
    conn: ClientConnection,
    fanout: SessionFanout,
    encoder: StreamEncoder,
    *,
    heartbeat_s: float,
    history_batch: int,
    last_event_id: tuple[str, str] | None = None,
) -> None:
    """Feed ``encoder`` the session until it has finished or ``conn`` is closed."""
    try:
        await pump(
            conn,
            fanout,
            last_event_id,
            _Sink(conn, encoder, None),
            heartbeat_s=heartbeat_s,
            history_batch=history_batch,
        )
    finally:
        conn.close("done")
        fanout.unsubscribe(conn)


class EncodedStreamResponse:
    """Stream one session to one client through ``encoder`` until it finishes or they leave."""

    def __init__(
        self,
        conn: ClientConnection,
        fanout: SessionFanout,
        encoder: StreamEncoder,
        last_event_id: tuple[str, str] | None,
        *,
        heartbeat_s: float,
        history_batch: int,
        idle_timeout_s: float = 0.0,
        headers: Sequence[tuple[str, str]] = (),
        on_close: Callable[[ClientConnection], None] | None = None,
        on_finished: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.on_finished = on_finished
        self.conn = conn
        self.fanout = fanout
        self.encoder = encoder
        self.last_event_id = last_event_id
        self.heartbeat_s = heartbeat_s
        self.history_batch = history_batch
        self.idle_timeout_s = idle_timeout_s
        self.headers = [*_HEADERS, *((k.encode(), v.encode()) for k, v in headers)]
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        sink = _Sink(self.conn, self.encoder, send)
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(receive))
        try:
            await pump(
                self.conn,
                self.fanout,
                self.last_event_id,
                sink,
                heartbeat_s=self.heartbeat_s,
                history_batch=self.history_batch,
                idle_timeout_s=self.idle_timeout_s,
            )
        except OSError:
            self.conn.close("client_gone")
        finally:
            self.conn.close("done")
            watcher.cancel()
            await asyncio.wait([watcher])
            self.fanout.unsubscribe(self.conn)
            if self.on_close is not None:
                self.on_close(self.conn)
        if self.encoder.finished and self.on_finished is not None:
            await self.on_finished()
        if not sink.ended and self.conn.closed_reason in ("done", "client_gone"):
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch_disconnect(self, receive: Receive) -> None:
        try:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    return
        finally:
            self.conn.close("client_gone")
