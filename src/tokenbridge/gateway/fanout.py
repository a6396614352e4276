"""SessionFanout: a fixed set of XREAD loops that feed every connection of this process.

Each session with at least one connection here is owned by one of ``fanout_readers`` readers
(by hash of the session id). A reader blocks in one ``XREAD BLOCK`` over all of its sessions'
streams plus a private *wake* stream; subscribing a new session writes to the wake stream, so
the blocked read returns at once and is issued again with the new stream (no sleep-polling, no
race: an XADD before the XREAD is still seen by it). Every entry is decoded and encoded once
and handed to each connection without awaiting any of them.

The number of Redis connections is ``fanout_readers`` (one each, dedicated) whatever the number
of clients and sessions. Multi-key XREAD needs all streams on one node: on Redis Cluster this
module would need one read per slot (see docs/architecture.md).

Exactness of the seam: :meth:`SessionFanout.subscribe` registers the connection *before* its
history is read. Every entry is then either dispatched after registration (the connection gets
it live) or existed before the history read began (the history has it); ids already sent are cut
by :meth:`ClientConnection.unsent`. Hence no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import ConnectionPool, Redis

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.frames import Batch, Frame, parse_entry_id
from tokenbridge.store.client import REDIS_DOWN_ERRORS, Backoff
from tokenbridge.store.resp import XreadCommand, send_one
from tokenbridge.store.scripts import Scripts, SessionState
from tokenbridge.wire.events import decode_entry
from tokenbridge.wire.keys import Keys

__all__ = ["FanoutStats", "SessionFanout", "decode_entries"]

log = logging.getLogger(__name__)

Entries = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass
class FanoutStats:
    """Counters of one process's fan-out, shown in /v1/status."""

    read: int = 0
    invalid: int = 0
    delivered_batches: int = 0
    reconnects: int = 0
    lagged: int = 0


def decode_entries(
    entries: Entries, epoch: str, session_id: str, stats: FanoutStats | None = None
) -> list[Frame]:
    """Decode raw entries into frames; entries that break the wire format are logged, skipped."""
    frames: list[Frame] = []
    for raw_id, fields in entries:
        entry_id = raw_id.decode()
        try:
            frames.append(Frame(entry_id, epoch, decode_entry(fields)))
        except InvalidEntry as exc:
            if stats is not None:
                stats.invalid += 1
            log.warning(
                "invalid entry skipped session=%s entry_id=%s error=%s", session_id, entry_id, exc
            )
    return frames


@dataclass(eq=False, slots=True)  # slots: one per session held, thousands per process
class _Feed:
    """One session read by one reader: its cursor, its connections here, the last seq seen
    per running generation (a jump means entries were trimmed before this reader saw them)."""

    session_id: str
    key: str
    cursor: str
    epoch: str
    connections: set[ClientConnection] = field(default_factory=set)
    seqs: dict[str, int] = field(default_factory=dict)
    key_arg: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.key_arg = XreadCommand.key(self.key)

    def lost_entries(self, frames: list[Frame]) -> bool:
        """Track seq per generation; True if a generation's seq jumped (entries lost)."""
        seqs = self.seqs
        lost = False
        for frame in frames:
            event = frame.event
            previous = seqs.get(event.generation_id)
            if previous is not None and event.seq != previous + 1:
                lost = True
            if event.kind in ("end", "error"):
                seqs.pop(event.generation_id, None)
            else:
                if len(seqs) >= 256:  # bounded: forget the oldest generation
                    del seqs[next(iter(seqs))]
                seqs[event.generation_id] = event.seq
        return lost


def _fields(raw: Any) -> dict[bytes, bytes]:
    if isinstance(raw, dict):
        return raw
    it = iter(raw)
    return dict(zip(it, it, strict=False))


def _stream_items(reply: Any) -> Any:
    """XREAD's reply as (key, entries) pairs, whether RESP2 (list) or RESP3 (map)."""
    if reply is None:
        return ()
    if isinstance(reply, dict):
        return reply.items()
    return reply


class _Reader:
    """One XREAD loop over a share of the sessions, on its own dedicated connection.

    The XREAD is hand-packed (``store/resp.py``): each feed's key is encoded once, only the
    cursors change between reads.
    """

    def __init__(self, fanout: SessionFanout, index: int) -> None:
        self.fanout = fanout
        self.index = index
        self.feeds: dict[str, _Feed] = {}
        self.wake_key = fanout.keys.wake(fanout.node_id, index)
        self.wake_key_bytes = self.wake_key.encode()
        self.wake_arg = XreadCommand.key(self.wake_key)
        self.wake_cursor = "$"
        count, block = fanout.settings_read
        self.xread = XreadCommand(count, block)

    async def wake(self) -> None:
        """Make the blocked XREAD return so that it is issued again with the current feeds."""
        async with self.fanout.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.wake_key, {"w": 1}, maxlen=10, approximate=True)
            pipe.expire(self.wake_key, 86_400)
            await pipe.execute()

    async def run(self, stopping: asyncio.Event, make_pool: Callable[[], ConnectionPool]) -> None:
        backoff = Backoff()
        pool = make_pool()
        conn: Any = None
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            while not stopping.is_set():
                try:
                    await self._read_once(conn)
                    backoff.reset()
                except REDIS_DOWN_ERRORS as exc:
                    await conn.disconnect()
                    self.fanout.stats.reconnects += 1
                    delay = backoff.next()
                    log.warning(
                        "fanout reader=%d lost redis (%s); retrying in %.2fs",
                        self.index,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    await self._refresh_after_reconnect(stopping)
        finally:
            if conn is not None:
                await conn.disconnect()
            await pool.disconnect()

    async def _read_once(self, conn: Any) -> None:
        if self.wake_cursor == "$":
            # A concrete id, so that a wake written between two reads is never missed.
            last: Any = await self.fanout.redis.xrevrange(self.wake_key, count=1)
            self.wake_cursor = last[0][0].decode() if last else "0-0"
        feeds = list(self.feeds.values())
        keys = [self.wake_arg, *(feed.key_arg for feed in feeds)]
        command = self.xread.pack(keys, [self.wake_cursor, *(f.cursor for f in feeds)])
        reply = await send_one(conn, command)
        by_key = {feed.key.encode(): feed for feed in feeds}
        for raw_key, entries in _stream_items(reply):
            if raw_key == self.wake_key_bytes:
                self.wake_cursor = entries[-1][0].decode()
                continue
            feed = by_key.get(raw_key)
            if feed is None or self.feeds.get(feed.session_id) is not feed:
                continue  # unsubscribed while the read was in flight
            stats = self.fanout.stats
            pairs = [(raw_id, _fields(raw)) for raw_id, raw in entries]
            frames = decode_entries(pairs, feed.epoch, feed.session_id, stats)
            if any(frame.event.kind == "start" for frame in frames):
                # May fail (Redis down): the cursor has not moved, so the entries are read again.
                await self._check_epoch(feed, feed.cursor, frames)
                if self.feeds.get(feed.session_id) is not feed:
                    continue
            feed.cursor = entries[-1][0].decode()
            stats.read += len(entries)
            self._dispatch(feed, frames)

    async def _check_epoch(self, feed: _Feed, previous: str, frames: list[Frame]) -> None:
        """A generation starts: did its producer start a new stream (new epoch) after the old
        one expired? If that stream begins after all we delivered, nothing was lost: switch
        the ids over to the new epoch; otherwise the clients must resume and learn of the gap."""
        state = await self.fanout.session_state(feed.session_id)
        if state.epoch == feed.epoch:
            return
        if state.first_id and parse_entry_id(state.first_id) > parse_entry_id(previous):
            log.info("session stream renewed session=%s epoch=%s", feed.session_id, state.epoch)
            feed.epoch = state.epoch
            for frame in frames:
                frame.epoch = state.epoch
            return
        feed.epoch = state.epoch
        for conn in list(feed.connections):
            conn.close("epoch_changed")

    def _dispatch(self, feed: _Feed, frames: list[Frame]) -> None:
        stats = self.fanout.stats
        if not frames:
            return
        if feed.lost_entries(frames):
            # Trimmed before this reader got to them: cut the clients; their resume from
            # Last-Event-ID tells them exactly what is gone (a `gap` event).
            stats.lagged += 1
            log.warning(
                "entries trimmed before delivery session=%s cursor=%s; clients resume",
                feed.session_id,
                feed.cursor,
            )
            for conn in list(feed.connections):
                conn.close("lagged")
            return
        batch = Batch(frames)
        stats.delivered_batches += 1
        for conn in list(feed.connections):
            conn.deliver(batch)

    async def _refresh_after_reconnect(self, stopping: asyncio.Event) -> None:
        """After Redis came back: if a stream's epoch changed, its data was lost; say so.

        Every session is checked: a failed check is retried with backoff, never skipped (right
        after a restart pooled connections still point at the old server, and the next read
        may well succeed, leaving unchecked sessions with no event, gap or close, ever).
        """
        self.wake_cursor = "$"
        backoff = Backoff()
        todo = list(self.feeds.values())
        while todo and not stopping.is_set():
            feed = todo[-1]
            if self.feeds.get(feed.session_id) is not feed:
                todo.pop()  # unsubscribed meanwhile
                continue
            try:
                state = await self.fanout.session_state(feed.session_id)
            except REDIS_DOWN_ERRORS:
                await asyncio.sleep(backoff.next())
                continue
            todo.pop()
            if state.epoch != feed.epoch:
                log.warning(
                    "session stream lost with redis session=%s old_epoch=%s new_epoch=%s",
                    feed.session_id,
                    feed.epoch,
                    state.epoch,
                )
                feed.epoch = state.epoch
                feed.cursor = "0-0"
                for conn in list(feed.connections):
                    conn.close("epoch_changed")


class SessionFanout:
    """Feeds every :class:`ClientConnection` of this process from a fixed set of readers."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        make_pool: Callable[[], ConnectionPool],
        readers: int,
        block_ms: int,
        read_count: int,
        orphan_ttl_ms: int,
        node_id: str | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.node_id = node_id or secrets.token_hex(6)
        self.settings_read = (read_count, block_ms)
        self.orphan_ttl_ms = orphan_ttl_ms
        self.stats = FanoutStats()
        self._make_pool = make_pool
        self._readers = [_Reader(self, i) for i in range(readers)]
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<SessionFanout node={self.node_id} readers={len(self._readers)} "
            f"sessions={self.session_count} read={self.stats.read} invalid={self.stats.invalid}>"
        )

    @property
    def reader_count(self) -> int:
        return len(self._readers)

    @property
    def session_count(self) -> int:
        return sum(len(reader.feeds) for reader in self._readers)

    def _reader_for(self, session_id: str) -> _Reader:
        return self._readers[zlib.crc32(session_id.encode()) % len(self._readers)]

    async def session_state(self, session_id: str) -> SessionState:
        """The session stream's epoch and id bounds (creating the epoch if missing)."""
        return await self.scripts.session_state(
            self.keys.meta(session_id),
            self.keys.events(session_id),
            new_epoch=secrets.token_hex(4),
            orphan_ttl_ms=self.orphan_ttl_ms,
        )

    async def subscribe(self, conn: ClientConnection) -> SessionState:
        """Register ``conn`` for live events of its session; returns the state to resume from.

        Call before reading history (see the module docstring for why that order is exact).
        """
        state = await self.session_state(conn.session_id)
        reader = self._reader_for(conn.session_id)
        feed = reader.feeds.get(conn.session_id)
        if feed is None:
            feed = _Feed(
                conn.session_id,
                self.keys.events(conn.session_id),
                cursor=state.last_id or "0-0",
                epoch=state.epoch,
            )
            reader.feeds[conn.session_id] = feed
            feed.connections.add(conn)
            await reader.wake()
        else:
            feed.connections.add(conn)
        return state

    def unsubscribe(self, conn: ClientConnection) -> None:
        """Stop feeding ``conn``; a session with no connection left is dropped from its reader."""
        reader = self._reader_for(conn.session_id)
        feed = reader.feeds.get(conn.session_id)
        if feed is None:
            return
        feed.connections.discard(conn)
        if not feed.connections:
            del reader.feeds[conn.session_id]

    async def run(self) -> None:
        """Run every reader until :meth:`stop`; returns once they have all returned."""
        async with asyncio.TaskGroup() as group:
            for reader in self._readers:
                group.create_task(reader.run(self._stopping, self._make_pool))
            group.create_task(self._wake_on_stop())

    async def _wake_on_stop(self) -> None:
        await self._stopping.wait()
        for reader in self._readers:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):  # a failed read sees the flag too
                await reader.wake()

    def stop(self) -> None:
        """Ask the readers to return (each does once its current XREAD returns)."""
        self._stopping.set()
