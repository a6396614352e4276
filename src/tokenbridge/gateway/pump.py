"""pump: the transport-neutral life of one connection: resume, history, live, close.

Every transport (SSE, WebSocket) and every encoding (``gateway/encodings/``) runs :func:`pump`
with the connection's :class:`~tokenbridge.gateway.encodings.Encoder` (what to write) and a
:class:`Transport` (how to write it). Order: subscribe to live events, decide where to resume
(``gap`` if history was lost), replay history, then live events until the connection closes.
Each write carries everything queued for the connection (coalesced); batches are cut after what
the client already has, which makes the seam between history and live events exact.

Timers: the wait for the next batch is bounded by the next keep-alive and, when
``idle_timeout_s`` is set, by the idle deadline, so the idle check costs no task or timer of
its own. Every write goes through :meth:`ClientConnection.write`, so a close (slow client,
shutdown) aborts a write stuck on a client that stopped reading; the closing write that
follows gets at most ``CLOSING_TIMEOUT_S``.

Direct writes: a transport that can write synchronously (:class:`DirectTransport`: SSE on
uvicorn, ``gateway/direct_http.py``) gets, for the live phase, a :class:`_Live` writer that the
connection uses while the pump is parked (``ClientConnection.next_batches``): batches delivered
to an idle connection are cut, encoded and written by one loop callback per iteration for all
connections, without waking this task. The heartbeat then counts from the last write
(``conn.last_activity``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, cast

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.encodings.base import Chunk, Encoder
from tokenbridge.gateway.fanout import SessionFanout
from tokenbridge.gateway.frames import Batch
from tokenbridge.gateway.resume import iter_history

__all__ = ["CLOSING_TIMEOUT_S", "DIRECT_MAX_EVENTS", "DirectTransport", "Transport", "pump"]

log = logging.getLogger(__name__)

CLOSING_TIMEOUT_S = 5.0
"""How long the final write of a connection the server closes (``: closed <reason>``, the
WebSocket close frame) may wait for a client that does not read; then the socket is dropped."""


class Transport(Protocol):
    """How one transport writes an encoder's chunks to its client."""

    async def send(self, chunk: Chunk) -> int:
        """Write one chunk; returns its size."""

    async def finish(self, chunk: Chunk | None) -> None:
        """The server ends the stream, with these last bytes if any (not when the client left)."""


DIRECT_MAX_EVENTS = 64
"""Events a direct write may carry; a larger burst goes through the connection's task, which
waits for the socket before each (bounded) write, so a client that stops reading holds at most
one such write beyond flow control's high-water mark."""


class DirectTransport(Transport, Protocol):
    """A transport that can also write at once, outside the connection's task."""

    def ready(self) -> bool:
        """Whether :meth:`write_now` may be called (connected, not paused by flow control)."""

    def write_now(self, chunk: Chunk) -> int:
        """Write one chunk now (only when :meth:`ready`); returns its size."""


class _Live:
    """The direct writer of one connection's live phase (see the module docstring)."""

    __slots__ = ("conn", "encoder", "max_events", "transport")

    def __init__(
        self,
        conn: ClientConnection,
        encoder: Encoder,
        transport: DirectTransport,
        max_events: int,
    ) -> None:
        self.conn = conn
        self.encoder = encoder
        self.transport = transport
        self.max_events = max_events

    def __call__(self, batches: list[Batch]) -> bool:
        """Write ``batches`` now, in one write (True), or leave them to the task (False:
        paused or gone; nothing done)."""
        transport = self.transport
        if not transport.ready():
            return False
        # A burst goes to the task, which waits for the socket before each bounded write.
        if (len(batches) > 1 or len(batches[0].frames) > self.max_events) and sum(
            len(b.frames) for b in batches
        ) > self.max_events:
            return False
        conn = self.conn
        cut = []
        for batch in batches:
            unsent = batch.after(conn.last_key)
            if unsent.frames:
                cut.append(unsent)
                conn.mark_sent(unsent, 0)
        if not cut:
            return True
        try:  # runs in a loop callback: an encoder's bug must end this connection only
            chunk = self.encoder.encode(cut)
            if chunk is not None:
                conn.bytes_sent += transport.write_now(chunk)
        except Exception:
            log.exception("direct write failed session=%s", conn.session_id)
            conn.close("internal_error")
            return True
        if self.encoder.finished:
            conn.close("done")
        return True


async def pump(
    conn: ClientConnection,
    fanout: SessionFanout,
    last_event_id: tuple[str, str] | None,
    encoder: Encoder,
    transport: Transport,
    *,
    heartbeat_s: float,
    history_batch: int,
    idle_timeout_s: float = 0.0,
) -> None:
    """Serve ``conn`` until it is closed; the caller unsubscribes it afterwards.

    The server's close reason (not ``client_gone``) goes out through :meth:`Encoder.closing`
    and :meth:`Transport.finish`, bounded by ``CLOSING_TIMEOUT_S``. An encoder that sets
    ``finished`` ends the stream with reason ``done`` after that write.
    """
    await _start(conn, fanout, last_event_id, encoder, transport, history_batch)
    live = None
    max_events = min(DIRECT_MAX_EVENTS, fanout.batch_events)
    if getattr(transport, "write_now", None) is not None:
        live = _Live(conn, encoder, cast(DirectTransport, transport), max_events)
    # Live events until the connection is closed. Kept in this frame rather than a helper's:
    # every idle connection holds the frames it waits in (one less is ~300 bytes less).
    last_beat = time.monotonic()
    while not conn.closed:
        now = time.monotonic()
        next_heartbeat = max(last_beat, conn.last_activity) + heartbeat_s
        wait_s = next_heartbeat - now
        if idle_timeout_s:
            idle_left = conn.last_activity + idle_timeout_s - now
            if idle_left <= 0:
                conn.close("idle")
                break
            wait_s = min(wait_s, idle_left)
        batches = await conn.next_batches(max(wait_s, 0.0), live)
        if batches is None:
            break
        if batches:
            for group in _groups(batches, fanout.batch_events):  # bounded writes
                await _write(conn, encoder, transport, group)
            last_beat = time.monotonic()
        elif time.monotonic() >= max(last_beat, conn.last_activity) + heartbeat_s:
            chunk = encoder.keepalive()
            if chunk is not None:
                await conn.write(transport.send(chunk))
            last_beat = time.monotonic()
    reason = conn.closed_reason
    if reason is not None and reason != "client_gone":
        try:
            async with asyncio.timeout(CLOSING_TIMEOUT_S):
                await transport.finish(encoder.closing(reason))
        except TimeoutError:
            log.info("client did not read its close session=%s reason=%s", conn.session_id, reason)


async def _start(
    conn: ClientConnection,
    fanout: SessionFanout,
    last_event_id: tuple[str, str] | None,
    encoder: Encoder,
    transport: Transport,
    history_batch: int,
) -> None:
    """Subscribe, decide where to resume, write the preamble and the history."""
    opening = await fanout.open(conn, last_event_id)
    head = encoder.preamble()
    if opening.gap is not None:
        log.info("resume gap session=%s reason=%s", conn.session_id, opening.gap["reason"])
        gap = encoder.gap(opening.gap)
        if gap is not None:
            head = gap if head is None else head + gap  # type: ignore[operator]  # same type
    if head is not None:
        await conn.write(transport.send(head))
    if encoder.finished:  # e.g. an OpenAI encoding ends the stream at a gap
        conn.close("done")
        return
    for batch in opening.history:
        if conn.closed:
            return
        await _write(conn, encoder, transport, [batch])
    if opening.more_after is None:
        return
    async for batch in iter_history(
        fanout.redis,
        fanout.keys.events(conn.session_id),
        conn.session_id,
        opening.epoch,
        opening.more_after,
        history_batch,
        fanout.stats,  # counts invalid entries met, once per connection that replays them
    ):
        if conn.closed:
            break
        await _write(conn, encoder, transport, [batch])


def _groups(batches: list[Batch], limit: int) -> list[list[Batch]]:
    """Consecutive batches in groups of at most ``limit`` events (a batch alone may pass it):
    one write per group, so a client that stops reading stalls a write of bounded size."""
    groups: list[list[Batch]] = [[]]
    size = 0
    for batch in batches:
        if groups[-1] and size + len(batch) > limit:
            groups.append([])
            size = 0
        groups[-1].append(batch)
        size += len(batch)
    return groups


async def _write(
    conn: ClientConnection, encoder: Encoder, transport: Transport, batches: list[Batch]
) -> None:
    cut = []
    for batch in batches:
        unsent = conn.unsent(batch)
        if unsent.frames:
            cut.append(unsent)
            conn.mark_sent(unsent, 0)
    if not cut:
        return
    chunk = encoder.encode(cut)
    if chunk is not None:
        nbytes = await conn.write(transport.send(chunk))
        if nbytes is None:  # aborted by a close: none of it was written
            conn.events_sent -= sum(len(b) for b in cut)
        else:
            conn.bytes_sent += nbytes
    if encoder.finished:
        conn.close("done")
