"""ConnectionManager: the client connections of this process, per session, with limits and stats.

It owns the registry only; delivery is the fan-out's job and framing the transports'. Every
figure it reports is of this process (``/v1/status`` shows it beside the node id), and so is
every limit: a session may have ``max_per_session`` connections on *each* gateway node.

Admission (:meth:`ConnectionManager.create_connection`) is synchronous, so a check and the
registration it guards can never interleave with another connection's. Refusals raise
:class:`LimitExceeded` (HTTP 429, WebSocket close 1013) or, once :meth:`drain` was called,
:class:`Draining` (HTTP 503, WebSocket close 1012).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import Any

from tokenbridge.exceptions import Draining, LimitExceeded
from tokenbridge.gateway.client_connection import ClientConnection, Transport

__all__ = ["ConnectionManager"]


class ConnectionManager:
    """Connections by id, by session and by client address; counts what closed or refused them.

    ``closed`` counts connections by the reason they ended with: ``slow_client`` (cut at a full
    buffer), ``idle``, ``shutdown``, ``client_gone`` (the client left, or a write to it failed),
    ``epoch_changed``, ``lagged``, ... ``refused`` counts refusals by code.
    """

    def __init__(
        self,
        max_buffered_events: int,
        *,
        max_connections: int = 10_000,
        max_per_session: int = 100,
        max_per_address: int = 1000,
        idle_timeout_s: float = 0.0,
        max_buffered_bytes: int = 0,
    ) -> None:
        self.max_buffered_events = max_buffered_events
        self.max_buffered_bytes = max_buffered_bytes
        self.max_connections = max_connections
        self.max_per_session = max_per_session
        self.max_per_address = max_per_address
        self.idle_timeout_s = idle_timeout_s
        self.draining = False
        self._connections: dict[str, ClientConnection] = {}
        self._by_session: dict[str, set[str]] = {}
        self._by_address: Counter[str] = Counter()
        self.closed_reasons: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.events_sent = 0
        self.bytes_sent = 0

    def __len__(self) -> int:
        return len(self._connections)

    def __repr__(self) -> str:
        state = " draining" if self.draining else ""
        return (
            f"<ConnectionManager{state} connections={len(self._connections)} "
            f"sessions={len(self._by_session)} slow_client={self.closed_reasons['slow_client']}>"
        )

    def ensure_accepting(self) -> None:
        """Raise :class:`Draining` once this process drains (new requests go elsewhere)."""
        if self.draining:
            self.refused["draining"] += 1
            raise Draining(
                "this gateway is shutting down and takes no new request; retry now "
                "(another node answers; a stream resumes from its Last-Event-ID)"
            )

    def create_connection(
        self, session_id: str, transport: Transport, client_address: str | None = None
    ) -> ClientConnection:
        """Register a new connection; raises LimitExceeded past a limit, Draining when draining."""
        self.ensure_accepting()
        if len(self._connections) >= self.max_connections:
            self._refuse(
                "too_many_connections",
                f"this gateway process holds {len(self._connections)} connections, its limit "
                "(TOKENBRIDGE_LIMITS_MAX_CONNECTIONS); retry later or on another node",
                retry_after_s=1.0,
            )
        on_session = len(self._by_session.get(session_id, ()))
        if on_session >= self.max_per_session:
            self._refuse(
                "too_many_session_connections",
                f"session {session_id} has {on_session} connections on this gateway, its limit "
                "(TOKENBRIDGE_LIMITS_MAX_CONNECTIONS_PER_SESSION); close one (another tab?) first",
            )
        if client_address is not None and self._by_address[client_address] >= self.max_per_address:
            self._refuse(
                "too_many_address_connections",
                f"{client_address} holds {self._by_address[client_address]} connections to this "
                "gateway, its limit (TOKENBRIDGE_LIMITS_MAX_CONNECTIONS_PER_ADDRESS); close some "
                "first",
            )
        conn = ClientConnection(
            session_id, transport, self.max_buffered_events, client_address,
            self.max_buffered_bytes,
        )  # fmt: skip
        self._connections[conn.id] = conn
        self._by_session.setdefault(session_id, set()).add(conn.id)
        if client_address is not None:
            self._by_address[client_address] += 1
        return conn

    def _refuse(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        self.refused[code] += 1
        raise LimitExceeded(code, message, retry_after_s)

    def remove_connection(self, conn: ClientConnection) -> None:
        """Forget a connection (its transport has finished with it); counts its close reason."""
        if self._connections.pop(conn.id, None) is None:
            return
        ids = self._by_session.get(conn.session_id)
        if ids is not None:
            ids.discard(conn.id)
            if not ids:
                del self._by_session[conn.session_id]
        address = conn.client_address
        if address is not None:
            left = self._by_address[address] - 1
            if left > 0:
                self._by_address[address] = left
            else:
                del self._by_address[address]
        self.closed_reasons[conn.closed_reason or "unknown"] += 1
        self.events_sent += conn.events_sent
        self.bytes_sent += conn.bytes_sent

    def session_ids(self) -> Collection[str]:
        """The sessions with at least one connection here (a live view)."""
        return self._by_session.keys()

    def connections_for_session(self, session_id: str) -> list[ClientConnection]:
        return [self._connections[i] for i in self._by_session.get(session_id, ())]

    def close_all(self, reason: str) -> None:
        """Close every connection with ``reason``; their transports write it and end."""
        for conn in list(self._connections.values()):
            conn.close(reason)

    def drain(self, reason: str = "shutdown") -> None:
        """Take no new connection (:class:`Draining`) and close every open one with ``reason``
        (SSE ``: closed shutdown``, WebSocket 1012): clients reconnect to another node and
        resume from their last id. Never waits."""
        self.draining = True
        self.close_all(reason)

    def stats(self) -> dict[str, Any]:
        live = list(self._connections.values())
        return {
            "total": len(live),
            "active": sum(1 for c in live if not c.closed),
            "sessions": len(self._by_session),
            "addresses": len(self._by_address),
            "by_transport": dict(Counter(c.transport for c in live)),
            "buffered_events": sum(c.buffered_events for c in live),
            "events_sent": self.events_sent + sum(c.events_sent for c in live),
            "bytes_sent": self.bytes_sent + sum(c.bytes_sent for c in live),
            "closed": dict(self.closed_reasons),
            "slow_client_closed": self.closed_reasons["slow_client"],
            "refused": dict(self.refused),
            "draining": self.draining,
            "limits": {
                "max_connections": self.max_connections,
                "max_connections_per_session": self.max_per_session,
                "max_connections_per_address": self.max_per_address,
                "max_buffered_events": self.max_buffered_events,
                "max_buffered_bytes": self.max_buffered_bytes,
                "idle_timeout_s": self.idle_timeout_s,
            },
        }
