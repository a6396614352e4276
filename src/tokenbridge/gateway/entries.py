"""Decoding stream entries into frames, once per read, and the fan-out's counters.

Shared by the live path (``gateway/fanout.py``) and the history path (``gateway/opening.py``,
``gateway/resume.py``): an entry that breaks the wire format is logged and skipped, never fatal
to a loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.gateway.frames import Frame
from tokenbridge.wire.events import decode_entry

__all__ = ["Entries", "FanoutStats", "decode_entries", "decode_frame"]

log = logging.getLogger("tokenbridge.gateway.fanout")

Entries = list[tuple[bytes, dict[bytes, bytes]]]


@dataclass
class FanoutStats:
    """Counters of one process's fan-out, shown in /v1/status and /metrics."""

    read: int = 0
    invalid: int = 0
    delivered_batches: int = 0
    reconnects: int = 0
    lagged: int = 0
    repairs: int = 0
    memory_resumes: int = 0
    redis_resumes: int = 0
    subscribed: int = 0
    unsubscribed: int = 0


def decode_entries(
    entries: Entries, epoch: str, session_id: str, stats: FanoutStats | None = None
) -> list[Frame]:
    """Decode raw entries into frames; entries that break the wire format are logged, skipped."""
    frames: list[Frame] = []
    for raw_id, fields in entries:
        frame = decode_frame(raw_id.decode(), None, fields, epoch, session_id, stats)
        if frame is not None:
            frames.append(frame)
    return frames


def decode_frame(
    entry_id: str,
    key: tuple[int, int] | None,
    fields: dict[bytes, bytes],
    epoch: str,
    session_id: str,
    stats: FanoutStats | None = None,
) -> Frame | None:
    """One entry as a frame (``key``: its id already parsed, if it was); None, logged, if it
    breaks the wire format."""
    try:
        return Frame(entry_id, epoch, decode_entry(fields), key)
    except InvalidEntry as exc:
        if stats is not None:
            stats.invalid += 1
        log.warning(
            "invalid entry skipped session=%s entry_id=%s error=%s", session_id, entry_id, exc
        )
        return None
