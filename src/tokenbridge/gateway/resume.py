"""Resume: where a (re)connecting client starts, and the history it missed.

A client's ``Last-Event-ID`` is ``<epoch>:<entry id>``. Against the session stream's state:

==================================  ===============================================
the stream                          what the client gets
==================================  ===============================================
same epoch, nothing trimmed after   every entry after the id, then live ones
same epoch, entries after trimmed   ``gap`` (reason ``trimmed``), then what is left
gone (expired)                      ``gap`` (reason ``expired``), then new entries
other epoch (Redis lost the data)   ``gap`` (reason ``epoch_changed``), then all
==================================  ===============================================

Trimming removes a prefix, so it shows as a first retained id later than the client's id;
deletions (XDEL) show in Redis 7's ``max-deleted-entry-id`` (XINFO STREAM).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from tokenbridge.exceptions import InvalidRequest
from tokenbridge.gateway.entries import FanoutStats, decode_entries
from tokenbridge.gateway.frames import Batch, parse_entry_id, parse_event_id
from tokenbridge.store.scripts import SessionState

_LAST_POSSIBLE_ID = (2**64 - 1, 2**64 - 1)

__all__ = ["ResumePlan", "iter_history", "parse_last_event_id", "plan_resume"]


@dataclass(frozen=True, slots=True)
class ResumePlan:
    """Read history strictly after ``after_id``; tell the client about ``gap`` first, if any."""

    after_id: str
    gap: dict[str, Any] | None = None


def parse_last_event_id(value: str | None) -> tuple[str, str] | None:
    """Parse a client's Last-Event-ID; None when absent; InvalidRequest when malformed."""
    if value is None or value == "":
        return None
    try:
        return parse_event_id(value)
    except ValueError:
        raise InvalidRequest(
            "invalid_last_event_id",
            "Last-Event-ID must be an id this server sent, like 'a1b2c3d4:1700000000000-0'",
        ) from None


def plan_resume(state: SessionState, last: tuple[str, str] | None) -> ResumePlan:
    """Decide where a connection starts reading, and whether history was lost after its id."""
    if last is None:
        return ResumePlan("0-0")
    epoch, entry_id = last
    requested = f"{epoch}:{entry_id}"
    if epoch != state.epoch:
        reason = "epoch_changed" if state.exists else "expired"
        return ResumePlan("0-0", _gap(reason, requested, state))
    if not state.exists:
        return ResumePlan("0-0", _gap("expired", requested, state))
    if _lost_after(state, parse_entry_id(entry_id)):
        return ResumePlan(entry_id, _gap("trimmed", requested, state))
    return ResumePlan(entry_id)


def _lost_after(state: SessionState, key: tuple[int, int]) -> bool:
    """Were entries after ``key`` removed? Trimming removes a prefix of the stream, so yes
    when the first retained entry is later than ``key`` (conservatively also when ``key`` was
    the very last entry trimmed: Redis keeps no trace of what followed it). XDEL leaves
    ``max-deleted-entry-id`` behind (Redis 7); XTRIM does not (Redis 7.0), hence both checks.
    """
    if state.max_deleted_id and parse_entry_id(state.max_deleted_id) > key:
        return True
    if state.first_id:
        return parse_entry_id(state.first_id) > key
    return parse_entry_id(state.last_id) > key  # the stream exists but was emptied


def _gap(reason: str, requested: str, state: SessionState) -> dict[str, Any]:
    return {
        "reason": reason,
        "last_event_id": requested,
        "first_available_id": f"{state.epoch}:{state.first_id}" if state.first_id else None,
    }


async def iter_history(
    redis: Redis,
    events_key: str,
    session_id: str,
    epoch: str,
    after_id: str,
    batch_size: int,
    stats: FanoutStats | None = None,
) -> AsyncIterator[Batch]:
    """Yield the stream's entries after ``after_id`` in batches, until the end at read time."""
    cursor = after_id
    if parse_entry_id(cursor) == _LAST_POSSIBLE_ID:
        return  # nothing can follow it (and Redis rejects "(" before it)
    while True:
        entries: Any = await redis.xrange(events_key, min=f"({cursor}", max="+", count=batch_size)
        if not entries:
            return
        cursor = entries[-1][0].decode()
        frames = decode_entries(entries, epoch, session_id, stats)
        if frames:
            yield Batch(frames)
        if len(entries) < batch_size:
            return
