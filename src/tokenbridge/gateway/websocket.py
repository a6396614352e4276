"""WebSocket transport: the same events and ids as SSE, as JSON messages, plus client commands.

``GET /v1/sessions/{session_id}/ws[?last_event_id=...]``. Server messages are one event
``{"id", "event", "data"}`` or, when several were queued, a JSON array of them (one write).
Client messages (JSON, at most ``limits_max_websocket_message_bytes``, 4096 by default):

* ``{"type": "resume", "last_event_id": "..."}``: restart the stream right after that id;
* ``{"type": "cancel", "generation_id": "..."}``: cancel a generation of this session;
* ``{"type": "ping"}``: answered with ``{"type": "pong"}``.

Close codes: 1000 normal (also ``idle``: no event for ``connection_idle_timeout_s``), 1008
policy violation (bad id, bad message), 1009 message too big, 1012 service restart (the gateway
drains: reconnect elsewhere), 1013 try again later (the client was too slow, or a connection
limit was hit: ``too_many_...`` in the reason). The close reason is the code word
(``slow_client``, ``shutdown``, ``idle``, ``too_many_session_connections: ...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from tokenbridge.exceptions import AuthError, Draining, InvalidRequest, LimitExceeded
from tokenbridge.gateway import encodings
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.connection_manager import ConnectionManager
from tokenbridge.gateway.direct_http import DirectHttpProtocol
from tokenbridge.gateway.direct_ws import DirectFrames, DirectWSProtocol
from tokenbridge.gateway.encodings.base import Chunk, Encoding, StreamContext
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.pump import CLOSING_TIMEOUT_S
from tokenbridge.gateway.resume import parse_last_event_id
from tokenbridge.gateway.streaming import SessionStream, StreamOptions
from tokenbridge.settings import Settings
from tokenbridge.wire.keys import validate_id

__all__ = ["serve_websocket", "uvicorn_options"]

log = logging.getLogger(__name__)

# 1012/1013 tell a client to come back (elsewhere / later) and resume from its last id.
_CLOSE_CODES = {
    "idle": 1000,
    "shutdown": 1012,
    "slow_client": 1013,
    "lagged": 1013,
    "epoch_changed": 1013,
    "done": 1000,
}

Canceller = Callable[[str, str], Awaitable[bool]]
Authorizer = Callable[[str], Awaitable[None]]


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's protocol options for these settings (``tokenbridge serve`` and the tests).

    uvicorn refuses WebSocket messages over 16 x our limit before buffering them (close 1009);
    ours, past ``limits_max_websocket_message_bytes``, gets the clean close 1009
    ``message_too_big``. HTTP is :class:`DirectHttpProtocol` when httptools is installed,
    WebSocket :class:`~tokenbridge.gateway.direct_ws.DirectWSProtocol` when wsproto is.
    """
    options: dict[str, Any] = {
        "interface": "asgi3",  # the app's __call__ returns a coroutine (gateway/app.py)
        "ws_max_size": 16 * settings.limits_max_websocket_message_bytes,
        "ws_per_message_deflate": settings.websocket_compression,
    }
    if DirectHttpProtocol is not None:
        options["http"] = DirectHttpProtocol
    if DirectWSProtocol is not None:
        options["ws"] = DirectWSProtocol
    return options


class _WSWriter:
    """The pump's :class:`~tokenbridge.gateway.pump.Transport` for a WebSocket."""

    __slots__ = ("websocket",)

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket

    async def send(self, chunk: Chunk) -> int:
        assert isinstance(chunk, str), "a websocket encoding must return str"
        await self.websocket.send_text(chunk)
        return len(chunk)

    async def finish(self, chunk: Chunk | None) -> None:
        if isinstance(chunk, str):  # the close frame that follows carries the reason
            await self.websocket.send_text(chunk)


class _DirectWSWriter(_WSWriter):
    """The same, writing live messages straight to the socket (``gateway/direct_ws.py``)."""

    __slots__ = ("frames",)

    def __init__(self, websocket: WebSocket, frames: DirectFrames) -> None:
        super().__init__(websocket)
        self.frames = frames

    def ready(self) -> bool:
        return self.frames.ready()

    def write_now(self, chunk: Chunk) -> int:
        assert isinstance(chunk, str), "a websocket encoding must return str"
        self.frames.write(chunk)
        return len(chunk)


def _writer(websocket: WebSocket) -> _WSWriter:
    frames = DirectFrames.open(websocket.scope)
    return _WSWriter(websocket) if frames is None else _DirectWSWriter(websocket, frames)


@dataclass(slots=True)
class _Commands:
    """What the client's messages decided: a resume point, or a close code and reason."""

    resume: bool = False
    last: tuple[str, str] | None = None
    close_code: int | None = None
    close_reason: str | None = None


async def serve_websocket(
    websocket: WebSocket,
    fanout: SessionFanout,
    manager: ConnectionManager,
    cancel: Canceller,
    authorize: Authorizer,
    options: StreamOptions,
    *,
    max_message_bytes: int = 4096,
    encoding: Encoding | None = None,
) -> None:
    """Serve one WebSocket until either side closes it (``encoding``: ``websocket`` if None)."""
    encoding = encoding or encodings.get("websocket")
    await websocket.accept()
    try:
        session_id = validate_id(websocket.path_params["session_id"], "session_id")
        last = parse_last_event_id(websocket.query_params.get("last_event_id"))
        await authorize(session_id)
    except (InvalidRequest, AuthError) as exc:
        await websocket.close(1008, reason=f"{exc.code}: {exc}"[:120])  # before any event
        return
    close_code, reason = 1000, "done"
    while True:
        try:
            address = websocket.client.host if websocket.client else None
            stream = SessionStream(fanout, manager, options, session_id, "websocket", address)
        except LimitExceeded as exc:
            await websocket.close(1013, reason=f"{exc.code}: {exc}"[:120])
            return
        except Draining as exc:
            await websocket.close(1012, reason=f"{exc.code}: {exc}"[:120])
            return
        commands = _Commands()  # (not an asyncio.Event: that holds a deque per connection)
        encoder = encoding.open(StreamContext(session_id, resumed=last is not None))
        async with stream as conn:
            # A plain task rather than a TaskGroup (lighter per connection); a reader that
            # fails closes the connection, so the pump returns, and its error is raised here.
            reader = asyncio.get_running_loop().create_task(
                _read_commands(websocket, conn, cancel, commands, max_message_bytes)
            )
            try:
                await stream.run(encoder, _writer(websocket), last)
            except (WebSocketDisconnect, OSError):
                conn.close("client_gone")
            finally:
                reader.cancel()
                await asyncio.wait([reader])  # never raises; its error surfaces below
            error = None if reader.cancelled() else reader.exception()
            if error is not None:
                raise error
        if commands.resume:
            last = commands.last
            continue
        reason = conn.closed_reason or "done"
        close_code = commands.close_code or _CLOSE_CODES.get(reason, 1000)
        break
    if reason != "client_gone":
        # Bounded: a client that stopped reading never lets the close frame out; after
        # CLOSING_TIMEOUT_S, returning makes uvicorn drop the socket.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSING_TIMEOUT_S):
                await websocket.close(close_code, reason=(commands.close_reason or reason)[:120])


async def _read_commands(
    websocket: WebSocket,
    conn: ClientConnection,
    cancel: Canceller,
    commands: _Commands,
    max_message_bytes: int,
) -> None:
    """Handle client messages until the connection closes (closing it on a bad message).

    Any other error closes the connection too (the pump returns) and is raised by
    :func:`serve_websocket`."""
    # The server's ASGI receive, awaited here rather than through Starlette's receive_text()
    # and receive(): two frames less held by every idle WebSocket (~420 bytes).
    receive = getattr(websocket, "_receive", None)
    if not callable(receive):  # pragma: no cover  # Starlette changed
        receive = websocket.receive
    try:
        while True:
            try:
                message = await receive()
            except (WebSocketDisconnect, RuntimeError, OSError):
                conn.close("client_gone")
                return
            if message["type"] != "websocket.receive":  # websocket.disconnect
                websocket.client_state = WebSocketState.DISCONNECTED  # as Starlette records it
                conn.close("client_gone")
                return
            text = message.get("text")
            if text is None:  # a binary message: the protocol is JSON text
                commands.close_code, commands.close_reason = 1003, "binary_message"
                conn.close("binary_message")
                return
            if len(text) > max_message_bytes or len(text.encode()) > max_message_bytes:
                commands.close_code, commands.close_reason = 1009, "message_too_big"
                conn.close("message_too_big")
                return
            code = await _command(websocket, conn, cancel, commands, text)
            if code is not None:
                if code != "resume":
                    commands.close_code, commands.close_reason = 1008, code
                conn.close(code)
                return
    except Exception:
        conn.close("internal_error")
        raise


async def _command(
    websocket: WebSocket, conn: ClientConnection, cancel: Canceller, commands: _Commands,
    text: str,
) -> str | None:  # fmt: skip
    """Handle one client message; a close reason if the connection is to close."""
    try:
        message = json.loads(text)
        kind = message["type"]
        if kind == "ping":
            await websocket.send_text('{"type":"pong"}')
        elif kind == "resume":
            commands.last = parse_last_event_id(message.get("last_event_id"))
            commands.resume = True
            return "resume"
        elif kind == "cancel":
            generation_id = validate_id(message.get("generation_id"), "generation_id")
            found = await cancel(conn.session_id, generation_id)
            await websocket.send_text(
                json.dumps({"type": "cancel", "generation_id": generation_id, "found": found})
            )
        else:
            raise InvalidRequest("unknown_message", f"unknown message type {kind!r}")
    except (ValueError, KeyError, TypeError, InvalidRequest) as exc:
        return exc.code if isinstance(exc, InvalidRequest) else "invalid_message"
    return None
