"""SessionFanout: live events over sharded pub/sub, history from the stream; standalone or Cluster.

Each session held by this process is one *feed* (``feed.py``): subscribed to the session's
shard channel (``<prefix>:{sid}:live``) through the process's :class:`ShardSubscriber` (one
connection per Redis node, whatever the number of sessions). Producers append a batch and
publish it in one script (``store/live.py``): the message carries the entries and the id
before them, so a feed delivers them without reading Redis, and knows when it missed
something. This module holds the feeds' life (join, subscribe, linger, drop), the live path
(``_on_message`` -> ``_handle`` -> ``_deliver``, microseconds per token: keep it flat) and its
repair. Where a connection starts (from the feed's memory or from Redis, and what that costs)
is ``opening.py``.

Exact seam: a connection joins its feed before any history is read, and the feed's
subscription is confirmed before the read. A batch published after the read reaches the feed
(then the connection); one published before is in the read. Both may carry the same entries:
the feed drops entries up to its cursor, the connection cuts what it already sent
(:meth:`ClientConnection.unsent`).

Loss of live messages is repaired from the stream (``XRANGE (<cursor> +``): a message whose
``prev_id`` is past the feed's cursor, an empty message ("read the stream"), and every channel
the subscriber reports as subscribed again (reconnect, slot moved, probe failed). A repair that
finds its cursor gone (trimmed, or lost with a failover) closes the session's connections with
``lagged`` (or ``epoch_changed``); they resume and get a ``gap`` event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from typing import Any

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.entries import FanoutStats, decode_entries, decode_frame
from tokenbridge.gateway.feed import Feed as _Feed  # the names the live path (and tests) use
from tokenbridge.gateway.feed import after_delivered as _after_delivered  # noqa: F401 (tests)
from tokenbridge.gateway.feed import cursor_key as _cursor_key
from tokenbridge.gateway.frames import Batch, Frame, parse_entry_id
from tokenbridge.gateway.opening import Opening, RedisOpenings, from_memory
from tokenbridge.gateway.resume_reads import ResumeReads
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.store.live import LiveMessage, parse_live_message
from tokenbridge.store.scripts import Scripts, SessionState
from tokenbridge.store.subscriber import ShardSubscriber
from tokenbridge.wire.events import decode_entry
from tokenbridge.wire.keys import Keys

__all__ = ["FanoutStats", "Opening", "SessionFanout", "decode_entries"]

log = logging.getLogger(__name__)

_SUBSCRIBE_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, *REDIS_DOWN_ERRORS)
_PENDING_MAX = 64  # messages kept for a feed whose cursor is not known yet


class SessionFanout:
    """Feeds every :class:`ClientConnection` of this process; see the module docstring."""

    def __init__(
        self,
        redis: Any,
        scripts: Scripts,
        keys: Keys,
        *,
        history_batch: int = 1000,
        orphan_ttl_ms: int = 3_600_000,
        recent_events: int = 64,
        linger_s: float = 10.0,
        probe_s: float = 5.0,
        repair_concurrency: int = 16,
        batch_events: int = 1000,
        node_id: str | None = None,
        epoch_trust_s: float = 0.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.node_id = node_id or secrets.token_hex(6)
        self.history_batch = history_batch
        self.recent_events = recent_events
        self.linger_s = linger_s
        self.batch_events = batch_events
        self.epoch_trust_s = epoch_trust_s
        self.stats = FanoutStats()
        self.subscriber = ShardSubscriber(
            redis, self._on_message, self._on_resubscribed, keys.prefix, probe_s
        )
        self._feeds: dict[str, _Feed] = {}
        self._by_channel: dict[bytes, _Feed] = {}
        self._idle: collections.OrderedDict[str, _Feed] = collections.OrderedDict()
        self._repairs = asyncio.Semaphore(repair_concurrency)
        self.reads = ResumeReads(redis, keys, self._spawn)
        self.openings = RedisOpenings(
            redis,
            scripts,
            keys,
            self.reads,
            self.stats,
            self._start_at,
            history_batch=history_batch,
            orphan_ttl_ms=orphan_ttl_ms,
        )
        self._group: asyncio.TaskGroup | None = None
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<SessionFanout node={self.node_id} sessions={self.session_count} "
            f"lingering={len(self._idle)} read={self.stats.read} repairs={self.stats.repairs}>"
        )

    @property
    def reader_count(self) -> int:
        """Redis pub/sub connections (one per node)."""
        return self.subscriber.connection_count

    @property
    def session_count(self) -> int:
        """Sessions with at least one connection here (lingering ones not counted)."""
        return len(self._feeds) - len(self._idle)

    @property
    def lingering_count(self) -> int:
        return len(self._idle)

    # -- connections -------------------------------------------------------------------------

    async def open(self, conn: ClientConnection, last: tuple[str, str] | None) -> Opening:
        """Register ``conn`` for live events and say where it starts (``opening.py``)."""
        feed = self._join(conn)
        await feed.ready
        known = last is not None and feed.cursor is not None
        opening = from_memory(feed, last) if known else None
        if opening is not None and time.monotonic() - feed.heard_at < self.epoch_trust_s:
            self.stats.memory_resumes += 1  # a live message proved the epoch lately: no Redis
            return opening
        if opening is not None:
            # The stream may have expired or been renewed without a message: one HGET says.
            epoch: Any = await self.redis.hget(self.keys.meta(conn.session_id), "epoch")
            opening = from_memory(feed, last)  # again: events may have come meanwhile
            if opening is not None and epoch is not None and epoch.decode() == feed.epoch:
                self.stats.memory_resumes += 1
                return opening
        self.stats.redis_resumes += 1
        return await self.openings.from_redis(feed, last)

    def unsubscribe(self, conn: ClientConnection) -> None:
        """Stop feeding ``conn``; its feed lingers ``linger_s`` once it has no connection."""
        feed = self._feeds.get(conn.session_id)
        if feed is None:
            return
        feed.connections.discard(conn)
        if not feed.connections:
            feed.idle_since = time.monotonic()
            self._idle[feed.session_id] = feed
            self._idle.move_to_end(feed.session_id)

    def _join(self, conn: ClientConnection) -> _Feed:
        sid = conn.session_id
        feed = self._feeds.get(sid)
        if feed is None:
            channel = self.keys.live(sid).encode()
            loop = asyncio.get_running_loop()
            feed = _Feed(sid, channel, loop.create_future())
            self._feeds[sid] = feed
            self._by_channel[channel] = feed
            self._spawn(self._subscribe(feed))
        self._idle.pop(sid, None)
        feed.connections.add(conn)
        return feed

    async def _subscribe(self, feed: _Feed) -> None:
        try:
            await self.subscriber.subscribe(feed.channel)
        except _SUBSCRIBE_ERRORS as exc:
            if not feed.ready.done():
                feed.ready.set_exception(exc)
            self._drop(feed, f"subscribe failed: {exc}")
            return
        self.stats.subscribed += 1
        if not feed.ready.done():
            feed.ready.set_result(None)

    def _drop(self, feed: _Feed, reason: str) -> None:
        if reason != "idle":
            log.warning("session feed dropped session=%s (%s)", feed.session_id, reason)
        if self._feeds.get(feed.session_id) is feed:
            del self._feeds[feed.session_id]
            self._by_channel.pop(feed.channel, None)
            self._idle.pop(feed.session_id, None)
            self.subscriber.unsubscribe(feed.channel)
            self.stats.unsubscribed += 1
        for conn in list(feed.connections):
            conn.close("lagged")

    # -- where the stream stands -------------------------------------------------------------

    async def session_state(self, session_id: str) -> SessionState:
        """The session stream's epoch and id bounds (creating the epoch if missing)."""
        return await self.openings.session_state(session_id)

    def _start_at(self, feed: _Feed, epoch: str, cursor: str) -> None:
        """A feed learns where the stream stands; the messages that waited are applied."""
        if feed.cursor is not None:
            return
        feed.epoch, feed.cursor, feed.recent_base = epoch, cursor, cursor
        feed.cursor_key = None
        pending, feed.pending = feed.pending, []
        for message in pending:
            self._handle(feed, message)

    # -- live --------------------------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        feed = self._by_channel.get(channel)
        if feed is not None:
            self._handle(feed, parse_live_message(data))

    def _handle(self, feed: _Feed, message: LiveMessage | None) -> None:
        if feed.cursor is None:
            if len(feed.pending) < _PENDING_MAX:
                feed.pending.append(message)
            elif feed.pending[-1] is not None:
                feed.pending.append(None)  # too many: read the stream once it is known
            return
        if feed.repairing:
            feed.dirty = True
            return
        if message is None:
            self._repair(feed)
            return
        if message.epoch != feed.epoch:
            self._epoch_changed(feed, message)
            return
        prev_id = message.prev_id
        if prev_id != feed.cursor and parse_entry_id(prev_id) > _cursor_key(feed):
            self._repair(feed)  # something was published that this feed never heard
            return
        feed.heard_at = time.monotonic()
        self._deliver(feed, message.entries)

    def _epoch_changed(self, feed: _Feed, message: LiveMessage) -> None:
        """A new stream (expired and written again, or a loss found by its producer)."""
        assert feed.cursor is not None
        entries = message.entries
        renewed = message.prev_id == "0-0" and entries
        if renewed and parse_entry_id(entries[0][0].decode()) > _cursor_key(feed):
            log.info("session stream renewed session=%s epoch=%s", feed.session_id, message.epoch)
            feed.epoch = message.epoch
            feed.recent = None
            feed.recent_base = feed.cursor
            self._deliver(feed, entries)
            return
        log.warning("session epoch changed session=%s epoch=%s", feed.session_id, message.epoch)
        for conn in list(feed.connections):
            conn.close("epoch_changed")
        feed.epoch = message.epoch
        feed.cursor = entries[-1][0].decode() if entries else message.prev_id
        feed.cursor_key = None
        feed.recent = None
        feed.recent_base = feed.cursor

    def _deliver(self, feed: _Feed, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Decode the entries past the cursor (each id parsed once) and hand them, as one
        batch shared by every connection, to the session's connections."""
        assert feed.cursor is not None
        cursor = _cursor_key(feed)
        frames: list[Frame] = []
        epoch, fresh, last_id, last_key = feed.epoch, 0, "", cursor
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            key = parse_entry_id(entry_id)
            if key <= cursor:
                continue
            fresh += 1
            last_id, last_key = entry_id, key
            try:
                frames.append(Frame(entry_id, epoch, decode_entry(fields), key))
            except InvalidEntry:  # logged and counted by decode_frame
                decode_frame(entry_id, key, fields, epoch, feed.session_id, self.stats)
        if not fresh:
            return
        feed.cursor, feed.cursor_key = last_id, last_key
        self.stats.read += fresh
        if not frames:
            return
        limit = self.recent_events
        if limit:
            recent = feed.recent
            if recent is None:
                recent = feed.recent = collections.deque()
            for frame in frames:
                if len(recent) >= limit:
                    feed.recent_base = recent.popleft().entry_id
                recent.append(frame)
        else:
            feed.recent_base = frames[-1].entry_id
        size = self.batch_events
        for at in range(0, len(frames), size):  # a huge producer batch: several writes
            batch = Batch(frames if len(frames) <= size else frames[at : at + size])
            self.stats.delivered_batches += 1
            for conn in feed.connections:  # deliver() never waits nor unsubscribes
                conn.deliver(batch)

    # -- repair ------------------------------------------------------------------------------

    def _on_resubscribed(self, channel: bytes) -> None:
        feed = self._by_channel.get(channel)
        if feed is not None and feed.cursor is not None:
            self.stats.reconnects += 1
            self._repair(feed)

    def _repair(self, feed: _Feed) -> None:
        if feed.repairing:
            feed.dirty = True
            return
        feed.repairing = True
        self.stats.repairs += 1
        self._spawn(self._repair_loop(feed))

    async def _repair_loop(self, feed: _Feed) -> None:
        """Read the stream from the feed's cursor until nothing more came meanwhile."""
        try:
            async with self._repairs:
                while self._feeds.get(feed.session_id) is feed:
                    feed.dirty = False
                    if not await self._repair_once(feed) and not feed.dirty:
                        return
        except REDIS_DOWN_ERRORS as exc:
            log.warning("repair failed session=%s (%s); clients resume", feed.session_id, exc)
            self._drop(feed, f"repair failed: {exc}")
        finally:
            feed.repairing = False

    async def _repair_once(self, feed: _Feed) -> bool:
        """One page from the cursor (included); True if a full page came (read on)."""
        assert feed.cursor is not None
        sid, cursor = feed.session_id, feed.cursor
        entries: Any = await self.redis.xrange(
            self.keys.events(sid), min=cursor, max="+", count=self.history_batch + 1
        )
        if cursor != "0-0" and (not entries or entries[0][0].decode() != cursor):
            state = await self.session_state(sid)  # the cursor is gone: trimmed, or lost
            reason = "epoch_changed" if state.epoch != feed.epoch else "lagged"
            log.warning("feed lost its place session=%s reason=%s", sid, reason)
            self.stats.lagged += 1
            for conn in list(feed.connections):
                conn.close(reason)
            feed.epoch, feed.cursor = state.epoch, state.last_id or "0-0"
            feed.cursor_key = None
            feed.recent = None
            feed.recent_base = feed.cursor
            return False
        self._deliver(feed, entries)
        return len(entries) > self.history_batch

    # -- lifecycle ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        if self._group is None:
            coro.close()
            raise RuntimeError("SessionFanout.run() is not running")
        return self._group.create_task(coro)

    async def run(self) -> None:
        """Run the subscriber and the linger sweep until :meth:`stop`."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self.subscriber.run())
            await self._sweep()
            self.subscriber.stop()
        self._group = None

    async def _sweep(self) -> None:
        """Once a second: unsubscribe the feeds idle for more than ``linger_s``."""
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(1.0):
                    await self._stopping.wait()
            except TimeoutError:
                pass
            deadline = time.monotonic() - self.linger_s
            while self._idle:
                feed = next(iter(self._idle.values()))
                if feed.idle_since > deadline and not self._stopping.is_set():
                    break
                self._drop(feed, "idle")

    def stop(self) -> None:
        """Ask :meth:`run` to return: feeds dropped, subscriber stopped."""
        self._stopping.set()
