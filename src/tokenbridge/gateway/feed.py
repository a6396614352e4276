"""Feed: what this process knows of one session it holds, and the lookups on it.

A feed is a session's place in its stream as the fan-out (``gateway/fanout.py``) saw it: the
epoch, the last entry delivered (the *cursor*), the last ``fanout_recent_events`` frames, and
the connections it feeds. Both the live path and the resume from memory
(``gateway/opening.py``) read it, so it lives apart from either.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.frames import Frame, parse_entry_id
from tokenbridge.store.live import LiveMessage

__all__ = ["Feed", "after_delivered", "cursor_key"]


@dataclass(eq=False, slots=True)
class Feed:
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


def after_delivered(feed: Feed, entry_id: str) -> list[Frame] | None:
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


def cursor_key(feed: Feed) -> tuple[int, int]:
    """The feed's cursor as a comparable pair, parsed once per change of cursor."""
    key = feed.cursor_key
    if key is None:
        key = feed.cursor_key = parse_entry_id(feed.cursor or "0-0")
    return key
