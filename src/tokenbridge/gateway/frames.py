"""Frames: an event encoded once for every connection that receives it.

The fan-out reader decodes an entry once and wraps it in a :class:`Frame`; its SSE bytes are
built on first use and shared by every connection. A :class:`Batch` is the frames of one
session from one read, with their SSE bytes joined once, so that a connection past its resume
seam writes a whole batch with one ``send``.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from tokenbridge.wire.events import Event
from tokenbridge.wire.keys import ID_PATTERN

__all__ = ["Batch", "Frame", "format_event_id", "parse_entry_id", "parse_event_id", "sse_message"]


_MAX_U64 = 2**64 - 1


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; raises ValueError if malformed."""
    ms, _, seq = entry_id.partition("-")
    if not (ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        raise ValueError(f"not a stream entry id: {entry_id[:60]!r}")
    if len(ms) > 20 or len(seq) > 20 or int(ms) > _MAX_U64 or int(seq) > _MAX_U64:
        raise ValueError(f"stream entry id out of range: {entry_id[:60]!r}")
    return int(ms), int(seq)


def format_event_id(epoch: str, entry_id: str) -> str:
    """The id clients see: the stream's epoch, then the Redis entry id."""
    return f"{epoch}:{entry_id}"


def parse_event_id(event_id: str) -> tuple[str, str]:
    """``"k3f9:1700000000000-3"`` -> ``("k3f9", "1700000000000-3")``; ValueError if malformed."""
    epoch, sep, entry_id = event_id.partition(":")
    if not sep or not ID_PATTERN.fullmatch(epoch):
        raise ValueError(f"not a tokenbridge event id: {event_id[:80]!r}")
    parse_entry_id(entry_id)
    return epoch, entry_id


def sse_message(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    """One SSE message; ``data`` is JSON on one line (JSON escapes every newline)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _plain(text: str) -> bool:
    """Text that JSON would copy unchanged between quotes (no escaping needed)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


class Frame:
    """One event of one session, with its ids; encodings are computed once, on first use.

    (Plain slots and ``None`` checks rather than ``functools.cached_property``, which takes a
    lock per access on Python 3.11: this object is on the per-token path.)
    """

    __slots__ = ("_json", "_key", "_sse", "entry_id", "epoch", "event")

    def __init__(self, entry_id: str, epoch: str, event: Event) -> None:
        self.entry_id = entry_id
        self.epoch = epoch
        self.event = event
        self._key: tuple[int, int] | None = None
        self._sse: bytes | None = None
        self._json: str | None = None

    @property
    def key(self) -> tuple[int, int]:
        """The entry id as a comparable pair; only needed at a connection's resume seam."""
        if self._key is None:
            self._key = parse_entry_id(self.entry_id)
        return self._key

    @property
    def event_id(self) -> str:
        return format_event_id(self.epoch, self.entry_id)

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            self._sse = self._encode_sse()
        return self._sse

    def _encode_sse(self) -> bytes:
        event = self.event
        if event.kind == "token":  # the hot path: only the text needs JSON escaping
            text = event.text
            quoted = f'"{text}"' if _plain(text) else json.dumps(text)
            return (
                f"id: {self.epoch}:{self.entry_id}\nevent: token\n"
                f'data: {{"generation_id":"{event.generation_id}","seq":{event.seq},'
                f'"ts":{event.ts},"text":{quoted}}}\n\n'
            ).encode()
        return sse_message(event.kind, event.to_data(), self.event_id)

    @property
    def json(self) -> str:
        """The WebSocket frame: the same event and id as SSE."""
        if self._json is None:
            self._json = json.dumps(
                {"id": self.event_id, "event": self.event.kind, "data": self.event.to_data()},
                separators=(",", ":"),
            )
        return self._json


class Batch:
    """Consecutive frames of one session, in stream order."""

    __slots__ = ("__dict__", "frames")

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def first_key(self) -> tuple[int, int]:
        return self.frames[0].key

    @property
    def last_key(self) -> tuple[int, int]:
        return self.frames[-1].key

    @cached_property
    def sse(self) -> bytes:
        return b"".join(frame.sse for frame in self.frames)

    @cached_property
    def json(self) -> str:
        """The WebSocket message: one event as an object, several as an array of them."""
        if len(self.frames) == 1:
            return self.frames[0].json
        return "[" + ",".join(frame.json for frame in self.frames) + "]"

    def after(self, key: tuple[int, int]) -> Batch:
        """The frames strictly after ``key`` (the resume seam): this batch if all are."""
        if self.first_key > key:
            return self
        return Batch([frame for frame in self.frames if frame.key > key])
