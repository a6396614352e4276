"""SessionFanout: live events over sharded pub/sub, history from the stream; standalone or Cluster.

Each session held by this process is one *feed*: subscribed to the session's shard channel
(``<prefix>:{sid}:live``) through the process's :class:`ShardSubscriber` (one connection per
Redis node, whatever the number of sessions). Producers append a batch and publish it in one
script (``store/live.py``): the message carries the entries and the id before them, so a feed
delivers them without reading Redis, and knows when it missed something.

Subscribing or resuming one connection costs the same whatever the number of sessions held:

- a session held here, resumed from an id the feed still remembers (its last
  ``fanout_recent_events`` entries; a feed lingers ``fanout_linger_s`` after its last
  connection left, because a reconnect storm is clients coming back): the history from
  memory, and no command at all if the feed heard a live message of its epoch less than
  ``epoch_trust_s`` ago (a renewed stream is published, so only a silent expiry could
  change the epoch; the gateway passes half the smaller of ``stream_retention_s`` and
  ``stream_max_generation_s``. One case escapes it: keys of a generation whose producer died
  near ``stream_max_generation_s`` may expire inside the window; the sweeper's later publish
  then renews the feed, so the reader gets ``epoch_changed``, never a silent gap);
  otherwise one ``HGET`` of the epoch;
- otherwise: ``HGET :meta epoch`` and the history from the id (the id included: finding it
  proves nothing after it was trimmed), batched with the other connections opening at the
  same time (``resume_reads.py``: one multi-stream ``XREAD`` on standalone Redis, an
  ``XRANGE`` each on a cluster), plus, for a session new here,
  its share of one batched ``SSUBSCRIBE``. An unknown epoch, a trimmed id or an empty reply falls
  back to the full state script and :func:`plan_resume` (``gap`` events).

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
from dataclasses import dataclass, field
from typing import Any

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.entries import FanoutStats, decode_entries, decode_frame
from tokenbridge.gateway.frames import Batch, Frame, parse_entry_id
from tokenbridge.gateway.resume import plan_resume
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


@dataclass(slots=True)
class Opening:
    """Where a connection starts: a ``gap`` to tell first, history to send, and where the
    rest of the history starts (``more_after``; None when ``history`` is all of it)."""

    epoch: str
    gap: dict[str, Any] | None = None
    history: list[Batch] = field(default_factory=list)
    more_after: str | None = None


@dataclass(eq=False, slots=True)
class _Feed:
    """One session held here: its connections, the last entry delivered, recent frames."""

    session_id: str
    channel: bytes
    ready: asyncio.Future[None]
    epoch: str = ""
    cursor: str | None = None  # None: not known yet (messages wait in ``pending``)
    cursor_key: tuple[int, int] | None = None  # ``cursor`` parsed (None: not yet)
    connections: set[ClientConnection] = field(default_factory=set)
    # Made on the first event: an idle session's feed holds no deque (~600 bytes).
    recent: collections.deque[Frame] | None = None
    recent_base: str = "0-0"  # the id just before ``recent[0]``
    pending: list[LiveMessage | None] = field(default_factory=list)
    repairing: bool = False
    dirty: bool = False  # a message arrived during a repair: read again
    idle_since: float = 0.0
    heard_at: float = float("-inf")  # last live message of ``epoch`` (time.monotonic())


def _after_delivered(feed: _Feed, entry_id: str) -> list[Frame] | None:
    """The recent frames after ``entry_id`` if it is one the feed delivered (or the one just
    before them), found by comparing strings; None if it is not (then ids are compared)."""
    recent = feed.recent or ()
    if entry_id == feed.cursor:
        return []
    if entry_id == feed.recent_base:
        return list(recent)
    for at in range(len(recent) - 1, -1, -1):
        if recent[at].entry_id == entry_id:
            return [recent[i] for i in range(at + 1, len(recent))]
    return None


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
        self.scripts = scripts
        self.keys = keys
        self.node_id = node_id or secrets.token_hex(6)
        self.history_batch = history_batch
        self.orphan_ttl_ms = orphan_ttl_ms
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
        """Register ``conn`` for live events and say where it starts (see the module doc)."""
        feed = self._join(conn)
        await feed.ready
        known = last is not None and feed.cursor is not None
        opening = self._from_memory(feed, last) if known else None
        if opening is not None and time.monotonic() - feed.heard_at < self.epoch_trust_s:
            self.stats.memory_resumes += 1  # a live message proved the epoch lately: no Redis
            return opening
        if opening is not None:
            # The stream may have expired or been renewed without a message: one HGET says.
            epoch: Any = await self.redis.hget(self.keys.meta(conn.session_id), "epoch")
            opening = self._from_memory(feed, last)  # again: events may have come meanwhile
            if opening is not None and epoch is not None and epoch.decode() == feed.epoch:
                self.stats.memory_resumes += 1
                return opening
        self.stats.redis_resumes += 1
        return await self._from_redis(feed, last)

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

    # -- resume ------------------------------------------------------------------------------

    def _from_memory(self, feed: _Feed, last: tuple[str, str] | None) -> Opening | None:
        """The history from the feed's recent frames, if they cover it."""
        if feed.repairing:
            return None
        if last is not None and last[0] == feed.epoch:
            frames = _after_delivered(feed, last[1])
            if frames is not None:  # the common case: no entry id parsed
                return Opening(feed.epoch, history=[Batch(frames)] if frames else [])
        cursor = _cursor_key(feed)
        if last is None:
            if feed.recent_base != "0-0":
                return None
            after = (0, 0)
        else:
            epoch, entry_id = last
            after = parse_entry_id(entry_id)
            if epoch != feed.epoch or not parse_entry_id(feed.recent_base) <= after <= cursor:
                return None
        frames = [frame for frame in feed.recent or () if frame.key > after]
        return Opening(feed.epoch, history=[Batch(frames)] if frames else [])

    async def _from_redis(self, feed: _Feed, last: tuple[str, str] | None) -> Opening:
        """One round trip in the common case; the state script when anything is unusual."""
        sid = feed.session_id
        start = last[1] if last is not None else "-"
        count = self.history_batch + 1
        epoch_raw, entries = await self._read_two(sid, start, count)
        epoch = epoch_raw.decode() if epoch_raw else None
        if last is not None:
            found = bool(entries) and entries[0][0].decode() == last[1]
            if epoch != last[0] or not found:
                return await self._from_state(feed, last)
            entries = entries[1:]
        elif epoch is None:
            return await self._from_state(feed, last)
        assert epoch is not None
        more = len(entries) >= self.history_batch
        if more:
            entries = entries[: self.history_batch]
        if feed.cursor is None:
            if more:
                tail: Any = await self.redis.xrevrange(self.keys.events(sid), count=1)
                end = tail[0][0].decode() if tail else "0-0"
            else:
                end = entries[-1][0].decode() if entries else (last[1] if last else "0-0")
            self._start_at(feed, epoch, end)
        frames = decode_entries(entries, epoch, sid, self.stats)
        after = entries[-1][0].decode() if more else None
        return Opening(epoch, history=[Batch(frames)] if frames else [], more_after=after)

    async def _read_two(self, sid: str, start: str, count: int) -> Any:
        """The epoch and a page of the stream, in a pipeline shared with the other
        connections opening now (``resume_reads.py``)."""
        return await self.reads.read(sid, start, count)

    async def _from_state(self, feed: _Feed, last: tuple[str, str] | None) -> Opening:
        state = await self.session_state(feed.session_id)
        self._start_at(feed, state.epoch, state.last_id or "0-0")
        plan = plan_resume(state, last)
        return Opening(state.epoch, gap=plan.gap, more_after=plan.after_id)

    async def session_state(self, session_id: str) -> SessionState:
        """The session stream's epoch and id bounds (creating the epoch if missing)."""
        return await self.scripts.session_state(
            self.keys.meta(session_id),
            self.keys.events(session_id),
            new_epoch=secrets.token_hex(4),
            orphan_ttl_ms=self.orphan_ttl_ms,
        )

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


def _cursor_key(feed: _Feed) -> tuple[int, int]:
    """The feed's cursor as a comparable pair, parsed once per change of cursor."""
    key = feed.cursor_key
    if key is None:
        key = feed.cursor_key = parse_entry_id(feed.cursor or "0-0")
    return key
