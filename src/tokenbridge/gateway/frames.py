"""Frames: an event decoded once for every connection that receives it.

The fan-out reader decodes an entry once and wraps it in a :class:`Frame`; a stateless
encoding (``gateway/encodings/``) builds its chunk on first use and every connection shares it.
A :class:`Batch` is the frames of one session from one read, with each encoding's chunks joined
once, so that a connection past its resume seam writes a whole batch with one ``send``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from tokenbridge.wire.events import Event
from tokenbridge.wire.keys import ID_PATTERN

__all__ = ["Batch", "Frame", "format_event_id", "parse_entry_id", "parse_event_id"]

_T = TypeVar("_T")


_MAX_U64 = 2**64 - 1


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; raises ValueError if malformed."""
    ms, _, seq = entry_id.partition("-")
    if (
        len(ms) <= 20
        and len(seq) <= 20
        and ms.isdigit()
        and seq.isdigit()
        and ms.isascii()
        and seq.isascii()
    ):
        key = int(ms), int(seq)
        if key[0] <= _MAX_U64 and key[1] <= _MAX_U64:
            return key
        raise ValueError(f"stream entry id out of range: {entry_id[:60]!r}")
    if ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit():
        raise ValueError(f"stream entry id out of range: {entry_id[:60]!r}")
    raise ValueError(f"not a stream entry id: {entry_id[:60]!r}")


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


class Frame:
    """One event of one session, with its ids; each encoding's chunk is computed once, on first
    use, and shared by every connection (:meth:`encoded`).

    (Plain slots and ``None`` checks rather than ``functools.cached_property``, which takes a
    lock per access on Python 3.11: this object is on the per-token path.)
    """

    __slots__ = ("_chunk", "_encoded", "_key", "_name", "entry_id", "epoch", "event")

    def __init__(
        self, entry_id: str, epoch: str, event: Event, key: tuple[int, int] | None = None
    ) -> None:
        self.entry_id = entry_id
        self.epoch = epoch
        self.event = event
        self._key = key  # parsed on first use, unless the reader already did
        self._name: str | None = None  # the first encoding asked for, and its chunk ...
        self._chunk: Any = None
        self._encoded: dict[str, Any] | None = None  # ... and any other

    @property
    def key(self) -> tuple[int, int]:
        """The entry id as a comparable pair; only needed at a connection's resume seam."""
        if self._key is None:
            self._key = parse_entry_id(self.entry_id)
        return self._key

    @property
    def event_id(self) -> str:
        return format_event_id(self.epoch, self.entry_id)

    def encoded(self, name: str, encode: Callable[[Frame], _T]) -> _T:
        """``encode(self)``, computed once per encoding ``name`` (stateless encodings only).

        One slot for the first encoding (a process usually serves one per session), a dict
        for more: no dict per token on the common path."""
        if self._name == name:
            chunk: _T = self._chunk
            return chunk
        if self._name is None:
            self._name, self._chunk = name, encode(self)
            return self._chunk  # type: ignore[no-any-return]
        return _more(self, name, encode)


def _more(frame: Any, name: str, encode: Callable[[Any], _T]) -> _T:
    cache = frame._encoded
    if cache is None:
        cache = frame._encoded = {}
    elif name in cache:
        value: _T = cache[name]
        return value
    value = cache[name] = encode(frame)
    return value


class Batch:
    """Consecutive frames of one session, in stream order."""

    __slots__ = ("_chunk", "_encoded", "_name", "frames", "size_estimate")

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self._name: str | None = None
        self._chunk: Any = None
        self._encoded: dict[str, Any] | None = None
        # Bytes on the wire, estimated once per batch by the first connection that needs it
        # (gateway/client_connection.py: the slow-client byte budget); -1 until then.
        self.size_estimate = -1

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def first_key(self) -> tuple[int, int]:
        return self.frames[0].key

    @property
    def last_key(self) -> tuple[int, int]:
        return self.frames[-1].key

    def encoded(self, name: str, encode: Callable[[Batch], _T]) -> _T:
        """``encode(self)``, computed once per encoding ``name`` (as :meth:`Frame.encoded`)."""
        if self._name == name:
            chunk: _T = self._chunk
            return chunk
        if self._name is None:
            self._name, self._chunk = name, encode(self)
            return self._chunk  # type: ignore[no-any-return]
        return _more(self, name, encode)

    def after(self, key: tuple[int, int]) -> Batch:
        """The frames strictly after ``key`` (the resume seam): this batch if all are."""
        if self.frames[0].key > key:
            return self
        return Batch([frame for frame in self.frames if frame.key > key])
