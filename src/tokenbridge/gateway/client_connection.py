"""ClientConnection: one client's view of a session, with a bounded buffer and a close reason.

The fan-out reader hands each connection whole :class:`Batch` es without ever awaiting it
(:meth:`ClientConnection.deliver` is synchronous). When a connection's buffer would pass its
bound, in events (``connection_max_buffered_events``) or in bytes
(``connection_max_buffered_bytes``: what is queued plus the write in progress), the
connection is closed with reason ``slow_client``: the client resumes from its
``Last-Event-ID`` and nothing is lost (or gets ``gap`` first if that history has expired),
while every other connection goes on unaffected. The kernel's part is capped too:
:func:`cap_send_buffers` sets ``SO_SNDBUF`` on the listening sockets, which accepted sockets
inherit (without it, loopback autotuning lets one socket hold megabytes). So one client holds
at most about ``connection_max_buffered_bytes + connection_send_buffer_bytes``.

A batch's size is estimated once per batch (its token texts plus a fixed overhead per event,
cached on the batch and shared by every connection): the per-delivery cost is one lookup.

A close also aborts a write in progress (:meth:`ClientConnection.write`): a client that stopped
reading leaves its transport's send waiting for the socket to drain, and without the abort
neither the cut nor a shutdown would ever reach that connection's task. The abort cancels the
writing task and takes that cancellation back (``Task.uncancel``), as ``asyncio.timeout`` does,
without a timeout object per write.

While a connection's task is parked waiting for events, its pump may lend it a *direct
writer* (:meth:`ClientConnection.next_batches`). :meth:`deliver` then queues the batch as
always but, instead of waking the task, puts the connection on its event loop's flush list: one
``call_soon`` per loop iteration (not per connection) hands every listed connection's queue to
its direct writer, which writes it to the socket at once, all batches in one write, unless
flow control paused the transport; then the task is woken and writes it the ordinary way, in
order. So a token costs no task switch and no trip down the ASGI send chain, the fan-out
reader sends its next read before the writes run (as when tasks did them), and batches
delivered within one iteration are coalesced.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypeVar

from tokenbridge.gateway.frames import Batch
from tokenbridge.gateway.wake_clock import wake_at

__all__ = ["ClientConnection", "DirectWriter", "Transport", "batch_bytes", "cap_send_buffers"]

Transport = Literal["sse", "websocket"]

_T = TypeVar("_T")

DirectWriter = Callable[[list[Batch]], bool]
"""Writes batches to the client now and returns True, or returns False (it cannot now, and
did nothing)."""

log = logging.getLogger(__name__)

_EVENT_OVERHEAD = 96  # bytes per event besides its text: id, event name, JSON, framing


def _estimate(batch: Batch) -> int:
    frames = batch.frames
    if len(frames) == 1:  # a live model's pace: one token per batch
        return len(frames[0].event.text) + _EVENT_OVERHEAD
    return sum(len(f.event.text) + _EVENT_OVERHEAD for f in frames)


def batch_bytes(batch: Batch) -> int:
    """About how many bytes ``batch`` takes on the wire; computed once per batch (shared
    by every connection it is delivered to)."""
    if batch.size_estimate < 0:
        batch.size_estimate = _estimate(batch)
    return batch.size_estimate


def cap_send_buffers(sockets: Iterable[Any], nbytes: int) -> None:
    """Set ``SO_SNDBUF`` on listening sockets (accepted ones inherit it); 0 leaves the kernel's
    autotuning. Where the platform refuses, the kernel default stays (logged at DEBUG)."""
    if nbytes <= 0:
        return
    for sock in sockets:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
        except (OSError, AttributeError) as exc:
            log.debug("SO_SNDBUF not set on %r (%s)", sock, exc)


class ClientConnection:
    """A connection of one client to one session.

    ``last_key`` is the id of the last event written to the client: batches are cut after it,
    which is what makes the seam between history and live events exact (no gap, no duplicate).
    ``last_activity`` is the monotonic time of the last event sent (or of the connect): the
    idle timeout counts from it.
    """

    __slots__ = (
        "_aborted",
        "_direct",
        "_flush_to",
        "_flushing",
        "_pending",
        "_pending_bytes",
        "_pending_events",
        "_waiter",
        "_write_task",
        "_writing_bytes",
        "bytes_sent",
        "client_address",
        "closed_reason",
        "created_at",
        "events_sent",
        "id",
        "last_activity",
        "last_key",
        "max_buffered_bytes",
        "max_buffered_events",
        "session_id",
        "transport",
    )

    def __init__(
        self,
        session_id: str,
        transport: Transport,
        max_buffered_events: int,
        client_address: str | None = None,
        max_buffered_bytes: int = 0,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.session_id = session_id
        self.transport: Transport = transport
        self.client_address = client_address
        self.max_buffered_events = max_buffered_events
        self.max_buffered_bytes = max_buffered_bytes  # 0: bounded in events only
        self.created_at = time.time()
        self.last_activity = time.monotonic()
        self.closed_reason: str | None = None
        self.events_sent = 0
        self.bytes_sent = 0
        self.last_key: tuple[int, int] = (0, 0)
        # A list and a future made only while waiting, not a deque and an asyncio.Event: an
        # idle connection costs ~1.3 KB less (each of those holds a 64-slot block).
        self._pending: list[Batch] = []
        self._pending_events = 0
        self._pending_bytes = 0
        self._writing_bytes = 0  # taken by next_batches, until the write returns
        self._waiter: asyncio.Future[None] | None = None
        self._direct: DirectWriter | None = None  # lent by the parked pump (next_batches)
        self._flush_to: _FlushList | None = None  # the loop's flush list, while lent
        self._flushing = False  # on the loop's flush list
        self._write_task: asyncio.Task[Any] | None = None  # the task inside write()
        self._aborted = False

    def __repr__(self) -> str:
        state = self.closed_reason or "open"
        return (
            f"<ClientConnection {self.id[:8]} session={self.session_id} {self.transport} "
            f"{state} sent={self.events_sent} buffered={self._pending_events}>"
        )

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def buffered_events(self) -> int:
        return self._pending_events

    @property
    def buffered_bytes(self) -> int:
        """Bytes queued or being written (estimated): what the byte budget bounds."""
        return self._pending_bytes + self._writing_bytes

    def deliver(self, batch: Batch) -> None:
        """Queue a batch for the client, never waiting; a full buffer closes as ``slow_client``."""
        if self.closed_reason is not None:
            return
        nbytes = batch_bytes(batch) if self.max_buffered_bytes else 0
        held = self._pending_bytes + self._writing_bytes
        events = len(batch.frames)
        if self._pending_events + events > self.max_buffered_events or (
            held and held + nbytes > self.max_buffered_bytes  # a lone batch always fits
        ):
            log.info(
                "client cut as slow session=%s connection=%s transport=%s buffered=%d "
                "buffered_bytes=%d sent=%d",
                self.session_id,
                self.id,
                self.transport,
                self._pending_events,
                held,
                self.events_sent,
            )
            self.close("slow_client")
            return
        self._pending.append(batch)
        self._pending_events += events
        self._pending_bytes += nbytes
        if self._direct is None:
            _wake(self._waiter)
        elif not self._flushing and self._flush_to is not None:
            self._flushing = True
            self._flush_to.add(self)

    def _flush(self) -> None:
        """Hand the queue to the direct writer (the flush list's callback); if it cannot
        write now, or the task is no longer parked, wake the task instead."""
        self._flushing = False
        direct = self._direct
        if not self._pending or self.closed_reason is not None:
            return
        if direct is not None:
            batches, events, nbytes = self._pending, self._pending_events, self._pending_bytes
            self._pending, self._pending_events, self._pending_bytes = [], 0, 0
            if direct(batches):
                return
            self._pending, self._pending_events, self._pending_bytes = batches, events, nbytes
        _wake(self._waiter)

    def close(self, reason: str) -> None:
        """Close with ``reason`` (kept for stats and the client); drops what is still buffered
        and aborts a write in progress. Never waits; safe to call again (the first reason wins).
        """
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._pending = []
        self._pending_events = 0
        self._pending_bytes = 0
        self._direct = None
        _wake(self._waiter)
        task = self._write_task
        if task is not None and not self._aborted:
            # The task waiting in the write gets CancelledError there; write() takes it back.
            self._aborted = True
            task.cancel()

    async def write(self, write: Awaitable[_T]) -> _T | None:
        """Await one write to the client; None if :meth:`close` aborted it (nothing written:
        transports wait for the socket to drain *before* they write)."""
        if self.closed_reason is not None:
            if asyncio.iscoroutine(write):
                write.close()
            return None
        task = self._write_task = asyncio.current_task()
        try:
            return await write
        except asyncio.CancelledError:
            if not self._aborted or task is None or task.uncancel() > 0:
                raise  # not (only) our abort: someone else cancels this task
            return None
        finally:
            self._write_task = None
            self._aborted = False
            self._writing_bytes = 0

    async def next_batches(
        self, timeout_s: float, direct: DirectWriter | None = None
    ) -> list[Batch] | None:
        """Everything buffered, waiting up to ``timeout_s``; ``[]`` on timeout, None once closed.

        While it waits, ``direct`` (if given) writes what is delivered (see the module doc)."""
        self._writing_bytes = 0  # the previous take has been written (or had nothing to write)
        if not self._pending and self.closed_reason is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            wake_at(loop, timeout_s, waiter)  # no timer handle per parked connection
            if direct is not None:
                self._flush_to = _flush_list(loop)  # looked up per park, not per token
                self._direct = direct
            try:
                await waiter
            finally:
                self._direct = None
                self._flush_to = None
                self._waiter = None
        if self.closed_reason is not None:
            return None
        batches = self._pending
        if batches:
            self._pending = []
            self._pending_events = 0
            self._writing_bytes = self._pending_bytes
            self._pending_bytes = 0
        return batches

    def unsent(self, batch: Batch) -> Batch:
        """The part of ``batch`` after what this client already has."""
        return batch.after(self.last_key)

    def mark_sent(self, batch: Batch, nbytes: int) -> None:
        """Record that ``batch`` was written to the client."""
        if batch.frames:
            self.last_key = batch.frames[-1].key
            self.events_sent += len(batch)
        self.bytes_sent += nbytes
        self.last_activity = time.monotonic()


class _FlushList:
    """The connections of one event loop to hand to their direct writers at the end of
    this iteration: one ``call_soon`` per iteration, whatever the number of connections.
    Holds its loop weakly (it is the value of a weak-keyed map of loops)."""

    __slots__ = ("_conns", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self._conns: list[ClientConnection] = []

    def add(self, conn: ClientConnection) -> None:
        if not self._conns:
            loop = self._loop()
            if loop is None:  # pragma: no cover  # the loop is gone: nothing runs any more
                return
            loop.call_soon(self._run)
        self._conns.append(conn)

    def _run(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn._flush()
            except Exception:  # one connection's failure must not leave the others unflushed
                log.exception("direct write failed; closing the connection conn=%r", conn)
                conn.close("internal_error")  # the client resumes from what it received


_flush_lists: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _FlushList] = (
    weakref.WeakKeyDictionary()
)


def _flush_list(loop: asyncio.AbstractEventLoop) -> _FlushList:
    pending = _flush_lists.get(loop)
    if pending is None:
        pending = _flush_lists[loop] = _FlushList(loop)
    return pending


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
