"""SessionStream: the connection context manager every streaming route uses.

A route (native SSE, WebSocket, the OpenAI-compatible ones) opens one per client connection::

    stream = SessionStream(fanout, manager, options, session_id, "sse", address)  # may refuse
    async with stream:
        await stream.run(encoder, transport, last_event_id)

Opening registers the connection with the :class:`ConnectionManager` at once (so a refusal,
``LimitExceeded`` or ``Draining``, is raised before any byte is sent and becomes a 429/503 or a
WebSocket close code); :meth:`SessionStream.run` is the same subscribe / history / live seam and
``Last-Event-ID`` resume for every encoding (``gateway/pump.py``); leaving closes the
connection, unsubscribes it from the fan-out and removes it from the manager, whatever happened.
Open it last in a route, right before returning the response that enters it: a connection
opened and never entered stays registered.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from tokenbridge.gateway.client_connection import ClientConnection, Transport
from tokenbridge.gateway.connection_manager import ConnectionManager
from tokenbridge.gateway.encodings.base import Encoder
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.pump import Transport as Writer
from tokenbridge.gateway.pump import pump

__all__ = ["SessionStream", "StreamOptions"]


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """The streaming settings every connection uses (from :class:`Settings`)."""

    heartbeat_s: float
    history_batch: int
    idle_timeout_s: float = 0.0
    retry_ms: int = 1000


class SessionStream:
    """One client's connection to one session, from registration to removal."""

    __slots__ = ("conn", "fanout", "manager", "options")

    def __init__(
        self,
        fanout: SessionFanout,
        manager: ConnectionManager,
        options: StreamOptions,
        session_id: str,
        transport: Transport,
        address: str | None,
    ) -> None:
        self.fanout = fanout
        self.manager = manager
        self.options = options
        self.conn: ClientConnection = manager.create_connection(session_id, transport, address)

    async def __aenter__(self) -> ClientConnection:
        return self.conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.conn.close("done")  # if nothing closed it before (a failure)
        self.fanout.unsubscribe(self.conn)
        self.manager.remove_connection(self.conn)

    def run(
        self, encoder: Encoder, writer: Writer, last_event_id: tuple[str, str] | None
    ) -> Coroutine[Any, Any, None]:
        """Stream from ``last_event_id`` (None: from the start) until the connection closes.

        Returns the pump's coroutine (to await) rather than awaiting it: one suspended frame
        less per open stream."""
        options = self.options
        return pump(
            self.conn,
            self.fanout,
            last_event_id,
            encoder,
            writer,
            heartbeat_s=options.heartbeat_s,
            history_batch=options.history_batch,
            idle_timeout_s=options.idle_timeout_s,
        )
