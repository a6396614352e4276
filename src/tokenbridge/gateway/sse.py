"""SSE transport: a session streamed through any ``sse`` encoding, with clean close.

:class:`EventStreamResponse` is a raw ASGI response. It races the connection's pump
(:meth:`SessionStream.run`) against the client's disconnect (as sse-starlette does): whichever
ends first ends the other. A connection cut by the server gets its encoding's closing bytes
(native: ``: closed <reason>``: ``slow_client``, ``idle``, ``shutdown``, ...), sent with the end
of the response; a client that does not read them within ``CLOSING_TIMEOUT_S`` has its socket
dropped instead. The native encoding's ``retry:`` carries jitter so that a mass reconnect (a
deploy) spreads over time. The OpenAI-compatible routes use this same response with their
own encoders.

On uvicorn (``gateway/direct_http.py``) an established stream writes its chunks straight to
the socket (:class:`_DirectSSEWriter`, a :class:`~tokenbridge.gateway.pump.DirectTransport`),
and learns of a client that left from the protocol's callback rather than from a task waiting
in ``receive()``; on other servers it sends through ASGI and watches ``receive()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.types import Message, Receive, Scope, Send

from tokenbridge.gateway.direct_http import DirectBody
from tokenbridge.gateway.encodings.base import Chunk, Encoder
from tokenbridge.gateway.streaming import SessionStream

__all__ = ["EventStreamResponse"]

log = logging.getLogger(__name__)


def _headers(media_type: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", f"{media_type}; charset=utf-8".encode()),
        (b"cache-control", b"no-cache, no-transform"),
        (b"x-accel-buffering", b"no"),
        (b"connection", b"keep-alive"),
    ]


_NATIVE_HEADERS = _headers("text/event-stream")


class _SSEWriter:
    """The pump's :class:`~tokenbridge.gateway.pump.Transport` for an SSE response."""

    __slots__ = ("asgi_send", "finished")

    def __init__(self, asgi_send: Send) -> None:
        self.asgi_send = asgi_send
        self.finished = False  # the response's last chunk was sent

    async def send(self, chunk: Chunk) -> int:
        assert isinstance(chunk, bytes), "an sse encoding must return bytes"
        await self.asgi_send({"type": "http.response.body", "body": chunk, "more_body": True})
        return len(chunk)

    async def finish(self, chunk: Chunk | None) -> None:
        body = chunk if isinstance(chunk, bytes) else b""
        with contextlib.suppress(OSError):
            await self.asgi_send({"type": "http.response.body", "body": body, "more_body": False})
        self.finished = True


class _DirectSSEWriter(_SSEWriter):
    """The same, writing body chunks straight to the socket (uvicorn's flow control kept)."""

    __slots__ = ("body",)

    def __init__(self, body: DirectBody, asgi_send: Send) -> None:
        super().__init__(asgi_send)
        self.body = body

    def ready(self) -> bool:
        return self.body.ready()

    def write_now(self, chunk: Chunk) -> int:
        assert isinstance(chunk, bytes), "an sse encoding must return bytes"
        self.body.write(chunk)
        return len(chunk)

    async def send(self, chunk: Chunk) -> int:
        body = self.body
        if not body.ready():
            await body.drain()
            if body.lost:
                return 0  # the protocol's callback closed the connection: the pump returns
        return self.write_now(chunk)


class EventStreamResponse:
    """Stream one session to one client over SSE, from its resume point, until it leaves."""

    __slots__ = ("encoder", "headers", "last_event_id", "stream")

    def __init__(
        self,
        stream: SessionStream,
        encoder: Encoder,
        last_event_id: tuple[str, str] | None,
        media_type: str = "text/event-stream",
    ) -> None:
        self.stream = stream
        self.encoder = encoder
        self.last_event_id = last_event_id
        native = media_type == "text/event-stream"
        self.headers = _NATIVE_HEADERS if native else _headers(media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        conn = self.stream.conn
        body = DirectBody.open(scope)
        watcher = None
        writer: _SSEWriter
        if body is not None:
            writer = _DirectSSEWriter(body, send)
            body.on_lost(conn)  # conn.close("client_gone") when the client leaves
        else:
            writer = _SSEWriter(send)
            # One plain task rather than a TaskGroup (a few hundred bytes less per connection):
            # the watcher only closes the connection, which makes the pump return.
            watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(receive))
        try:
            async with self.stream:
                try:
                    await self.stream.run(self.encoder, writer, self.last_event_id)
                except OSError:
                    conn.close("client_gone")  # the socket broke under a write
        finally:
            if body is not None:
                body.on_lost(None)
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait([watcher])  # never raises; its error surfaces below
            log.debug("sse closed session=%s reason=%s", conn.session_id, conn.closed_reason)
        error = None if watcher is None or watcher.cancelled() else watcher.exception()
        if error is not None:
            raise error
        if writer.finished or conn.closed_reason not in ("done", "client_gone"):
            return  # finished, or a client that did not read its close: uvicorn drops it
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch_disconnect(self, receive: Receive) -> None:
        try:
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    return
        finally:  # the client left (or receive failed): the pump returns
            self.stream.conn.close("client_gone")
