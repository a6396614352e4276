"""Stream entries: the events of a generation and their Redis field encoding.

One entry per event in the session stream, flat string fields so that any language can
produce with a plain ``XADD`` (docs/wire-format.md is the contract)::

    XADD tb:{s_1}:events MAXLEN ~ 10000 * v 1 kind token gen g_1 seq 3 ts 1700000000123 text "lo"

:func:`decode_entry` is the one reader of that format; it raises :class:`InvalidEntry` (and
nothing else) for an entry that breaks it, so that every loop can report and skip it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.wire.keys import ID_PATTERN

__all__ = [
    "END_REASONS",
    "KINDS",
    "WIRE_VERSION",
    "Event",
    "EventKind",
    "decode_entry",
    "now_ms",
]

WIRE_VERSION = "1"
EventKind = Literal["start", "token", "tool_call", "end", "error"]
KINDS: frozenset[str] = frozenset({"start", "token", "tool_call", "end", "error"})
_MAX_TEXT = 1_000_000
END_REASONS: frozenset[str] = frozenset(
    {"stop", "length", "cancelled", "tool_calls", "content_filter", "abandoned"}
)
"""``end.reason``: the model finished, hit ``max_tokens``, was cancelled, stopped to call tools,
was filtered, or no client read the stream for ``orphan_grace_s`` (abandoned)."""


_VALID_IDS: set[str] = set()  # generation ids already checked against ID_PATTERN


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch (the ``ts`` field)."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Event:
    """One event of a generation.

    ``seq`` counts 0, 1, 2 ... per generation (``start`` is 0). Fields that do not apply to a
    kind are left at their defaults and are not written to Redis.
    """

    kind: EventKind
    generation_id: str
    seq: int
    ts: int = field(default_factory=now_ms)
    text: str = ""
    model: str = ""
    reason: str = ""
    tokens: int = 0
    usage: dict[str, int] | None = None
    code: str = ""
    message: str = ""
    cached: bool = False
    index: int = 0
    call_id: str = ""
    name: str = ""
    arguments: str = ""

    def to_fields(self) -> dict[str, str | int]:
        """The Redis fields of this event (for XADD)."""
        fields: dict[str, str | int] = {
            "v": WIRE_VERSION,
            "kind": self.kind,
            "gen": self.generation_id,
            "seq": self.seq,
            "ts": self.ts,
        }
        if self.kind == "token":
            fields["text"] = self.text
        elif self.kind == "tool_call":
            fields.update(self._tool_call())
        elif self.kind == "start":
            fields["model"] = self.model
            if self.cached:
                fields["cached"] = 1
        elif self.kind == "end":
            fields["reason"] = self.reason
            fields["tokens"] = self.tokens
            if self.usage is not None:
                fields["usage"] = json.dumps(self.usage, separators=(",", ":"))
        else:
            fields["code"] = self.code
            fields["message"] = self.message
        return fields

    def to_data(self) -> dict[str, Any]:
        """The JSON payload clients see (SSE ``data:``, WebSocket frames)."""
        data: dict[str, Any] = {"generation_id": self.generation_id, "seq": self.seq, "ts": self.ts}
        if self.kind == "token":
            data["text"] = self.text
        elif self.kind == "tool_call":
            data.update(self._tool_call())
        elif self.kind == "start":
            data["model"] = self.model
            if self.cached:
                data["cached"] = True
        elif self.kind == "end":
            data["reason"] = self.reason
            data["tokens"] = self.tokens
            if self.usage is not None:
                data["usage"] = self.usage
        else:
            data["code"] = self.code
            data["message"] = self.message
        return data

    def _tool_call(self) -> dict[str, str | int]:
        """``index`` and ``arguments``; ``call_id`` and ``name`` only where set (first fragment)."""
        fields: dict[str, str | int] = {"index": self.index}
        if self.call_id:
            fields["call_id"] = self.call_id
        if self.name:
            fields["name"] = self.name
        fields["arguments"] = self.arguments
        return fields


def _text(fields: dict[bytes, bytes], name: bytes, required: bool = True) -> str:
    raw = fields.get(name)
    if raw is None:
        if required:
            raise InvalidEntry(f"missing field {name.decode()!r}")
        return ""
    if len(raw) > _MAX_TEXT:
        raise InvalidEntry(f"field {name.decode()!r} is longer than {_MAX_TEXT} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidEntry(f"field {name.decode()!r} is not UTF-8") from None


def _int(fields: dict[bytes, bytes], name: bytes, required: bool = True) -> int:
    raw = fields.get(name)
    if raw is None:
        if required:
            raise InvalidEntry(f"missing field {name.decode()!r}")
        return 0
    if not raw.isdigit() or len(raw) > 19:
        raise InvalidEntry(f"field {name.decode()!r} must be a non-negative integer")
    return int(raw)


def _usage(fields: dict[bytes, bytes]) -> dict[str, int] | None:
    raw = fields.get(b"usage")
    if raw is None:
        return None
    try:
        usage = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidEntry("field 'usage' is not JSON") from None
    if not isinstance(usage, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in usage.items()
    ):
        raise InvalidEntry("field 'usage' must be a JSON object of integers")
    return usage


_GEN_IDS: dict[bytes, str] = {}  # raw generation ids already checked, decoded


def _token(fields: dict[bytes, bytes]) -> Event | None:
    """The hot path: a well-formed token entry, or None to take the general path."""
    gen = _GEN_IDS.get(fields.get(b"gen", b""))
    seq, ts, text = fields.get(b"seq"), fields.get(b"ts"), fields.get(b"text")
    if (
        gen is None
        or seq is None
        or ts is None
        or text is None
        or not (seq.isdigit() and len(seq) <= 19 and ts.isdigit() and len(ts) <= 19)
        or len(text) > _MAX_TEXT
    ):
        return None
    try:
        return Event("token", gen, int(seq), int(ts), text.decode())
    except UnicodeDecodeError:
        return None


def decode_entry(fields: dict[bytes, bytes]) -> Event:
    """Decode the fields of one stream entry; raise :class:`InvalidEntry` if they break the format.

    Unknown extra fields are ignored (forward compatibility); a different ``v`` is rejected.
    """
    if not isinstance(fields, dict):
        raise InvalidEntry("entry is not a field map")
    if fields.get(b"kind") == b"token" and fields.get(b"v") == b"1":
        event = _token(fields)
        if event is not None:
            return event
    version = fields.get(b"v")
    if version != b"1":
        raise InvalidEntry(f"unsupported wire version {version!r}, expected b'1'")
    kind = _text(fields, b"kind")
    if kind not in KINDS:
        raise InvalidEntry(f"unknown kind {kind!r}")
    generation_id = _text(fields, b"gen")
    if generation_id not in _VALID_IDS:
        if not ID_PATTERN.fullmatch(generation_id):
            raise InvalidEntry(f"invalid generation id {generation_id[:80]!r}")
        if len(_VALID_IDS) >= 4096:  # bounded: generation ids repeat for a while, then stop
            _VALID_IDS.clear()
            _GEN_IDS.clear()
        _VALID_IDS.add(generation_id)
        _GEN_IDS[fields[b"gen"]] = generation_id
    event = Event(
        kind=kind,  # type: ignore[arg-type]  # checked against KINDS above
        generation_id=generation_id,
        seq=_int(fields, b"seq"),
        ts=_int(fields, b"ts"),
    )
    if kind == "token":
        event.text = _text(fields, b"text")
    elif kind == "tool_call":
        event.index = _int(fields, b"index")
        event.call_id = _text(fields, b"call_id", required=False)
        event.name = _text(fields, b"name", required=False)
        event.arguments = _text(fields, b"arguments")
    elif kind == "start":
        event.model = _text(fields, b"model", required=False)
        event.cached = fields.get(b"cached") in (b"1", b"true")
    elif kind == "end":
        event.reason = _text(fields, b"reason")
        if event.reason not in END_REASONS:
            raise InvalidEntry(f"unknown end reason {event.reason[:40]!r}")
        event.tokens = _int(fields, b"tokens")
        event.usage = _usage(fields)
    else:
        event.code = _text(fields, b"code")
        event.message = _text(fields, b"message", required=False)
    return event
