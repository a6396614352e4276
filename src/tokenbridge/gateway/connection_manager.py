"""ConnectionManager: the client connections of this process, per session, with stats.

It owns the registry only; delivery is the fan-out's job and framing the transports'. Every
figure it reports is of this process (``/v1/status`` shows it beside the node id).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tokenbridge.gateway.client_connection import ClientConnection, Transport

__all__ = ["ConnectionManager"]


class ConnectionManager:
    """Connections by id and by session; counts what closed them."""

    def __init__(self, max_buffered_events: int) -> None:
        self.max_buffered_events = max_buffered_events
        self._connections: dict[str, ClientConnection] = {}
        self._by_session: dict[str, set[str]] = {}
        self.closed_reasons: Counter[str] = Counter()
        self.events_sent = 0
        self.bytes_sent = 0

    def __len__(self) -> int:
        return len(self._connections)

    def create_connection(
        self, session_id: str, transport: Transport, client_address: str | None = None
    ) -> ClientConnection:
        """Register a new connection; raises LimitExceeded when a connection limit is hit."""
        conn = ClientConnection(session_id, transport, self.max_buffered_events)
        self._connections[conn.id] = conn
        self._by_session.setdefault(session_id, set()).add(conn.id)
        return conn

    def remove_connection(self, conn: ClientConnection) -> None:
        if self._connections.pop(conn.id, None) is None:
            return
        ids = self._by_session.get(conn.session_id)
        if ids is not None:
            ids.discard(conn.id)
            if not ids:
                del self._by_session[conn.session_id]
        self.closed_reasons[conn.closed_reason or "unknown"] += 1
        self.events_sent += conn.events_sent
        self.bytes_sent += conn.bytes_sent

    def connections_for_session(self, session_id: str) -> list[ClientConnection]:
        return [self._connections[i] for i in self._by_session.get(session_id, ())]

    def close_all(self, reason: str) -> None:
        for conn in list(self._connections.values()):
            conn.close(reason)

    def stats(self) -> dict[str, Any]:
        by_transport = Counter(c.transport for c in self._connections.values())
        live = list(self._connections.values())
        return {
            "total": len(live),
            "sessions": len(self._by_session),
            "by_transport": dict(by_transport),
            "events_sent": self.events_sent + sum(c.events_sent for c in live),
            "bytes_sent": self.bytes_sent + sum(c.bytes_sent for c in live),
            "closed": dict(self.closed_reasons),
        }
