"""pump: the transport-neutral life of one connection: resume, history, live, close.

Both transports (SSE, WebSocket) run :func:`pump` with a :class:`Sink` that frames and writes.
Order: subscribe to live events, decide where to resume (``gap`` if history was lost), replay
history, then live events until the connection closes. Each write carries everything queued
for the connection (coalesced); batches are cut after what the client already has, which
makes the seam between history and live events exact.

Timers: the wait for the next batch is bounded by the next heartbeat and, when
``idle_timeout_s`` is set, by the idle deadline, so the idle check costs no task or timer of
its own. Every write goes through :meth:`ClientConnection.write`, so a close (slow client,
shutdown) aborts a write stuck on a client that stopped reading; the closing write that
follows gets at most ``CLOSING_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.frames import Batch
from tokenbridge.gateway.resume import iter_history, plan_resume

__all__ = ["CLOSING_TIMEOUT_S", "Sink", "pump"]

log = logging.getLogger(__name__)

CLOSING_TIMEOUT_S = 5.0
"""How long the final write of a connection the server closes (``: closed <reason>``, the
WebSocket close frame) may wait for a client that does not read; then the socket is dropped."""


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
    idle_timeout_s: float = 0.0,
) -> None:
    """Serve ``conn`` until it is closed; the caller unsubscribes it afterwards.

    The server's close reason (not ``client_gone``) is written by :meth:`Sink.closing`,
    bounded by ``CLOSING_TIMEOUT_S``.
    """
    await _start(conn, fanout, last_event_id, sink, history_batch)
    # Live events until the connection is closed. Kept in this frame rather than a helper's:
    # every idle connection holds the frames it waits in (one less is ~300 bytes less).
    next_heartbeat = time.monotonic() + heartbeat_s
    while True:
        now = time.monotonic()
        wait_s = next_heartbeat - now
        if idle_timeout_s:
            idle_left = conn.last_activity + idle_timeout_s - now
            if idle_left <= 0:
                conn.close("idle")
                break
            wait_s = min(wait_s, idle_left)
        batches = await conn.next_batches(max(wait_s, 0.0))
        if batches is None:
            break
        if batches:
            await _write(conn, sink, batches)
            next_heartbeat = time.monotonic() + heartbeat_s
        elif time.monotonic() >= next_heartbeat:
            await conn.write(sink.heartbeat())
            next_heartbeat = time.monotonic() + heartbeat_s
    reason = conn.closed_reason
    if reason is not None and reason != "client_gone":
        try:
            async with asyncio.timeout(CLOSING_TIMEOUT_S):
                await sink.closing(reason)
        except TimeoutError:
            log.info("client did not read its close session=%s reason=%s", conn.session_id, reason)


async def _start(
    conn: ClientConnection,
    fanout: SessionFanout,
    last_event_id: tuple[str, str] | None,
    sink: Sink,
    history_batch: int,
) -> None:
    """Subscribe, decide where to resume, write the preamble and the history."""
    state = await fanout.subscribe(conn)
    plan = plan_resume(state, last_event_id)
    if plan.gap is not None:
        log.info("resume gap session=%s reason=%s", conn.session_id, plan.gap["reason"])
    await conn.write(sink.preamble(plan.gap))
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


async def _write(conn: ClientConnection, sink: Sink, batches: list[Batch]) -> None:
    cut = []
    for batch in batches:
        unsent = conn.unsent(batch)
        if unsent.frames:
            cut.append(unsent)
            conn.mark_sent(unsent, 0)
    if cut:
        nbytes = await conn.write(sink.write(cut))
        if nbytes is None:  # aborted by a close: none of it was written
            conn.events_sent -= sum(len(b) for b in cut)
        else:
            conn.bytes_sent += nbytes
