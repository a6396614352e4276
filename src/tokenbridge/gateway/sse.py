"""SSE transport: framing, Last-Event-ID resume, heartbeats and clean close.

:class:`EventStreamResponse` is a raw ASGI response. It races the event stream against the
client's disconnect in one task group (as sse-starlette does): whichever ends first ends the
other. Order on the wire: ``retry:`` hint, ``gap`` if history was lost, history, live events.
Each write carries every event queued for the connection (coalesced), encoded once per event
for all connections. A connection cut by the server gets a final ``: closed <reason>`` comment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.frames import Batch, sse_message
from tokenbridge.gateway.resume import iter_history, plan_resume

__all__ = ["EventStreamResponse"]

log = logging.getLogger(__name__)

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
    (b"connection", b"keep-alive"),
]


class EventStreamResponse:
    """Stream one session to one client over SSE, from its resume point, until it leaves."""

    def __init__(
        self,
        conn: ClientConnection,
        fanout: SessionFanout,
        last_event_id: tuple[str, str] | None,
        heartbeat_s: float,
        retry_ms: int,
        history_batch: int,
        on_close: Any = None,
    ) -> None:
        self.conn = conn
        self.fanout = fanout
        self.last_event_id = last_event_id
        self.heartbeat_s = heartbeat_s
        self.retry_ms = retry_ms
        self.history_batch = history_batch
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        try:
            async with asyncio.TaskGroup() as group:
                watcher = group.create_task(self._watch_disconnect(receive))
                try:
                    await self._stream(send)
                finally:
                    watcher.cancel()
        except OSError:
            self.conn.close("client_gone")  # the socket broke under a write
        finally:
            self.fanout.unsubscribe(self.conn)
            if self.on_close is not None:
                self.on_close(self.conn)
            log.debug(
                "sse closed session=%s reason=%s", self.conn.session_id, self.conn.closed_reason
            )
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch_disconnect(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.conn.close("client_gone")
                return

    async def _write(self, send: Send, body: bytes) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _stream(self, send: Send) -> None:
        conn = self.conn
        state = await self.fanout.subscribe(conn)
        plan = plan_resume(state, self.last_event_id)
        # Jitter spreads a mass reconnect (a deploy, a Redis blip) over time.
        retry = int(self.retry_ms * random.uniform(1.0, 1.5))
        preamble = f"retry: {retry}\n\n".encode()
        if plan.gap is not None:
            preamble += sse_message("gap", plan.gap)
            log.info("resume gap session=%s reason=%s", conn.session_id, plan.gap["reason"])
        await self._write(send, preamble)
        async for batch in iter_history(
            self.fanout.redis,
            self.fanout.keys.events(conn.session_id),
            conn.session_id,
            state.epoch,
            plan.after_id,
            self.history_batch,
            self.fanout.stats,
        ):
            if conn.closed:
                break
            await self._send_batches(send, [batch])
        while True:
            batches = await conn.next_batches(self.heartbeat_s)
            if batches is None:
                break
            if not batches:
                await self._write(send, b": ping\n\n")
                continue
            await self._send_batches(send, batches)
        if conn.closed_reason not in (None, "client_gone"):
            with contextlib.suppress(OSError):
                await self._write(send, f": closed {conn.closed_reason}\n\n".encode())

    async def _send_batches(self, send: Send, batches: list[Batch]) -> None:
        conn = self.conn
        parts: list[bytes] = []
        for batch in batches:
            unsent = conn.unsent(batch)
            if unsent.frames:
                parts.append(unsent.sse)
                conn.mark_sent(unsent, 0)
        if parts:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            await self._write(send, body)
            conn.bytes_sent += len(body)
