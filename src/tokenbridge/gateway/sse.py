"""SSE transport: framing, Last-Event-ID resume, heartbeats and clean close.

:class:`EventStreamResponse` is a raw ASGI response. It races the connection's :func:`pump`
against the client's disconnect in one task group (as sse-starlette does): whichever ends
first ends the other. A connection cut by the server gets a final ``: closed <reason>`` comment
(``slow_client``, ``idle``, ``shutdown``, ...), sent with the end of the response; a client that
does not read it within ``CLOSING_TIMEOUT_S`` has its socket dropped instead. ``retry:``
carries jitter so that a mass reconnect (a deploy) spreads over time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.frames import Batch, sse_message
from tokenbridge.gateway.pump import pump

__all__ = ["EventStreamResponse"]

log = logging.getLogger(__name__)

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]


class _SSESink:
    __slots__ = ("finished", "retry_ms", "send")

    def __init__(self, send: Send, retry_ms: int) -> None:
        self.send = send
        self.retry_ms = retry_ms
        self.finished = False  # the response's last chunk was sent

    async def _body(self, body: bytes) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": True})

    async def preamble(self, gap: dict[str, Any] | None) -> None:
        retry = int(self.retry_ms * random.uniform(1.0, 1.5))
        body = f"retry: {retry}\n\n".encode()
        if gap is not None:
            body += sse_message("gap", gap)
        await self._body(body)

    async def write(self, batches: list[Batch]) -> int:
        body = batches[0].sse if len(batches) == 1 else b"".join(b.sse for b in batches)
        await self._body(body)
        return len(body)

    async def heartbeat(self) -> None:
        await self._body(b": ping\n\n")

    async def closing(self, reason: str) -> None:
        body = f": closed {reason}\n\n".encode()
        with contextlib.suppress(OSError):
            await self.send({"type": "http.response.body", "body": body, "more_body": False})
        self.finished = True


class EventStreamResponse:
    """Stream one session to one client over SSE, from its resume point, until it leaves."""

    __slots__ = (
        "conn",
        "fanout",
        "heartbeat_s",
        "history_batch",
        "idle_timeout_s",
        "last_event_id",
        "on_close",
        "retry_ms",
    )

    def __init__(
        self,
        conn: ClientConnection,
        fanout: SessionFanout,
        last_event_id: tuple[str, str] | None,
        heartbeat_s: float,
        retry_ms: int,
        history_batch: int,
        on_close: Callable[[ClientConnection], None] | None = None,
        idle_timeout_s: float = 0.0,
    ) -> None:
        self.conn = conn
        self.fanout = fanout
        self.last_event_id = last_event_id
        self.heartbeat_s = heartbeat_s
        self.retry_ms = retry_ms
        self.history_batch = history_batch
        self.on_close = on_close
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        sink = _SSESink(send, self.retry_ms)
        # One plain task rather than a TaskGroup (a few hundred bytes less per connection):
        # the watcher only closes the connection, which makes the pump return.
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
            self.conn.close("client_gone")  # the socket broke under a write
        finally:
            self.conn.close("done")  # if the pump failed; else it is closed already
            watcher.cancel()
            await asyncio.wait([watcher])  # never raises; its error, if any, surfaces below
            self.fanout.unsubscribe(self.conn)
            if self.on_close is not None:
                self.on_close(self.conn)
            log.debug(
                "sse closed session=%s reason=%s", self.conn.session_id, self.conn.closed_reason
            )
        error = None if watcher.cancelled() else watcher.exception()
        if error is not None:
            raise error
        if sink.finished or self.conn.closed_reason not in ("done", "client_gone"):
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
            self.conn.close("client_gone")
