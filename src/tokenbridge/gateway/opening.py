"""Opening: where a connection of the fan-out starts, from the feed's memory or from Redis.

:meth:`SessionFanout.open <tokenbridge.gateway.fanout.SessionFanout.open>` joins the
connection to its session's feed, waits for the feed's subscription, then asks here. Deciding
costs the same whatever the number of sessions held:

- a session held here, resumed from an id the feed still remembers (its last
  ``fanout_recent_events`` entries; a feed lingers ``fanout_linger_s`` after its last
  connection left, because a reconnect storm is clients coming back): the history from
  memory (:func:`from_memory`), and no command at all if the feed heard a live message of its
  epoch less than ``epoch_trust_s`` ago (a renewed stream is published, so only a silent
  expiry could change the epoch; the gateway passes half the smaller of
  ``stream_retention_s`` and ``stream_max_generation_s``. One case escapes it: keys of a
  generation whose producer died near ``stream_max_generation_s`` may expire inside the
  window; the sweeper's later publish then renews the feed, so the reader gets
  ``epoch_changed``, never a silent gap); otherwise one ``HGET`` of the epoch;
- otherwise (:class:`RedisOpenings`): ``HGET :meta epoch`` and the history from the id (the
  id included: finding it proves nothing after it was trimmed), batched with the other
  connections opening at the same time (``resume_reads.py``: one multi-stream ``XREAD`` on
  standalone Redis, an ``XRANGE`` each on a cluster), plus, for a session new here, its share
  of one batched ``SSUBSCRIBE``. An unknown epoch, a trimmed id or an empty reply falls back
  to the full state script and :func:`plan_resume` (``gap`` events). A feed whose cursor is
  not known yet learns it from that read.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenbridge.gateway.entries import FanoutStats, decode_entries
from tokenbridge.gateway.feed import Feed, after_delivered, cursor_key
from tokenbridge.gateway.frames import Batch, parse_entry_id
from tokenbridge.gateway.resume import plan_resume
from tokenbridge.gateway.resume_reads import ResumeReads
from tokenbridge.store.scripts import Scripts, SessionState
from tokenbridge.wire.keys import Keys

__all__ = ["Opening", "RedisOpenings", "from_memory"]


@dataclass(slots=True)
class Opening:
    """Where a connection starts: a ``gap`` to tell first, history to send, and where the
    rest of the history starts (``more_after``; None when ``history`` is all of it)."""

    epoch: str
    gap: dict[str, Any] | None = None
    history: list[Batch] = field(default_factory=list)
    more_after: str | None = None


def from_memory(feed: Feed, last: tuple[str, str] | None) -> Opening | None:
    """The history from the feed's recent frames, if they cover it."""
    if feed.repairing:
        return None
    if last is not None and last[0] == feed.epoch:
        frames = after_delivered(feed, last[1])
        if frames is not None:  # the common case: no entry id parsed
            return Opening(feed.epoch, history=[Batch(frames)] if frames else [])
    cursor = cursor_key(feed)
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


class RedisOpenings:
    """Where a connection starts when the feed's memory does not say: read from Redis.

    ``start_at(feed, epoch, cursor)`` tells a feed whose cursor is not known yet where the
    stream stands (the fan-out then applies the live messages that waited)."""

    def __init__(
        self,
        redis: Any,
        scripts: Scripts,
        keys: Keys,
        reads: ResumeReads,
        stats: FanoutStats,
        start_at: Callable[[Feed, str, str], None],
        *,
        history_batch: int,
        orphan_ttl_ms: int,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys
        self.reads = reads
        self.stats = stats
        self._start_at = start_at
        self.history_batch = history_batch
        self.orphan_ttl_ms = orphan_ttl_ms

    async def from_redis(self, feed: Feed, last: tuple[str, str] | None) -> Opening:
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

    async def _from_state(self, feed: Feed, last: tuple[str, str] | None) -> Opening:
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
