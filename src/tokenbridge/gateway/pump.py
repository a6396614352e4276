"""pump: the transport-neutral life of one connection: resume, history, live, close.

Both transports (SSE, WebSocket) run :func:`pump` with a :class:`Sink` that frames and writes.
Order: subscribe to live events, decide where to resume (``gap`` if history was lost), replay
history, then live events until the connection closes. Each write carries everything queued
for the connection (coalesced); batches are cut after what the client already has, which
makes the seam between history and live events exact.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.frames import Batch
from tokenbridge.gateway.resume import iter_history, plan_resume

__all__ = ["Sink", "pump"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    """How one transport writes to its client."""

    async def preamble(self, gap: dict[str, Any] | None) -> None:
        """First write: transport hints, and the ``gap`` event if history was lost."""

    async def write(self, batches: list[Batch]) -> int:
        """Write these (non-empty, already cut) batches at once; returns the bytes written."""

    async def heartbeat(self) -> None:
        """Nothing to send for a while: keep proxies and the client's timers happy."""

    async def closing(self, reason: str) -> None:
        """The server closes the connection for ``reason`` (not called when the client left)."""


async def pump(
    conn: ClientConnection,
    fanout: SessionFanout,
    last_event_id: tuple[str, str] | None,
    sink: Sink,
    *,
    heartbeat_s: float,
    history_batch: int,
) -> None:
    """Serve ``conn`` until it is closed; the caller unsubscribes it afterwards."""
    state = await fanout.subscribe(conn)
    plan = plan_resume(state, last_event_id)
    if plan.gap is not None:
        log.info("resume gap session=%s reason=%s", conn.session_id, plan.gap["reason"])
    await sink.preamble(plan.gap)
    async for batch in iter_history(
        fanout.redis,
        fanout.keys.events(conn.session_id),
        conn.session_id,
        state.epoch,
        plan.after_id,
        history_batch,
        fanout.stats,  # counts invalid entries met, once per connection that replays them
    ):
        if conn.closed:
            break
        await _write(conn, sink, [batch])
    while True:
        batches = await conn.next_batches(heartbeat_s)
        if batches is None:
            break
        if batches:
            await _write(conn, sink, batches)
        else:
            await sink.heartbeat()
    if conn.closed_reason not in (None, "client_gone"):
        await sink.closing(conn.closed_reason or "closed")


async def _write(conn: ClientConnection, sink: Sink, batches: list[Batch]) -> None:
    cut = []
    for batch in batches:
        unsent = conn.unsent(batch)
        if unsent.frames:
            cut.append(unsent)
            conn.mark_sent(unsent, 0)
    if cut:
        conn.bytes_sent += await sink.write(cut)
