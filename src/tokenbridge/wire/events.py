"""Stream entries: the events of a generation, declared once, and their Redis field encoding.

One entry per event in the session stream, flat string fields so that any language can
produce with a plain ``XADD`` (docs/wire-format.md is the contract)::

    XADD tb:{s_1}:events MAXLEN ~ 10000 * v 1 kind token gen g_1 seq 3 ts 1700000000123 text "lo"

:data:`SCHEMA` declares every kind and its fields once; the Redis fields (:meth:`Event.to_fields`),
the client JSON (:meth:`Event.to_data`), the pipeline JSON (``wire/pipeline.py``) and the
readers (:func:`decode_entry`, :func:`event_from_data`) are derived from it. Encodings for
clients (``gateway/encodings/``) start from :meth:`Event.to_data`. :func:`decode_entry` raises
:class:`InvalidEntry` (and nothing else) for an entry that breaks the format, so that every loop
can report and skip it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.wire.keys import ID_PATTERN

__all__ = [
    "END_REASONS",
    "KINDS",
    "SCHEMA",
    "TERMINAL_KINDS",
    "WIRE_VERSION",
    "Event",
    "EventKind",
    "FieldSpec",
    "decode_entry",
    "event_from_data",
    "now_ms",
    "plain_json",
]

WIRE_VERSION = "1"
EventKind = Literal["start", "token", "tool_call", "end", "error"]
FieldType = Literal["str", "int", "bool", "usage"]
_MAX_TEXT = 1_000_000

END_REASONS: frozenset[str] = frozenset(
    {"stop", "length", "cancelled", "tool_calls", "content_filter", "abandoned"}
)
"""``end.reason``: the model finished, hit ``max_tokens``, was cancelled, stopped to call tools,
was filtered, or no client read the stream for ``orphan_grace_s`` (abandoned)."""


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One per-kind field: its wire name (Redis field, JSON key and :class:`Event` attribute).

    ``required``: a reader rejects the entry without it. ``omit_default``: not written when it
    holds its default (``cached`` false, ``usage`` None, ``call_id``/``name`` after the
    first fragment of a call). ``choices``: the only values a reader accepts.
    """

    name: str
    type: FieldType = "str"
    required: bool = True
    omit_default: bool = False
    choices: frozenset[str] | None = None


SCHEMA: dict[str, tuple[FieldSpec, ...]] = {
    "start": (
        FieldSpec("model", required=False),
        FieldSpec("cached", "bool", required=False, omit_default=True),
    ),
    "token": (FieldSpec("text"),),
    "tool_call": (
        FieldSpec("index", "int"),
        FieldSpec("call_id", required=False, omit_default=True),
        FieldSpec("name", required=False, omit_default=True),
        FieldSpec("arguments"),
    ),
    "end": (
        FieldSpec("reason", choices=END_REASONS),
        FieldSpec("tokens", "int"),
        FieldSpec("usage", "usage", required=False, omit_default=True),
    ),
    "error": (FieldSpec("code"), FieldSpec("message", required=False)),
}
"""Every kind and its own fields, besides the common ``v kind gen seq ts``."""

KINDS: frozenset[str] = frozenset(SCHEMA)
DEFAULTS: dict[str, Any] = {"str": "", "int": 0, "bool": False, "usage": None}
"""A field's value when its kind does not set it (``omit_default`` compares with it)."""
TERMINAL_KINDS: frozenset[str] = frozenset({"end", "error"})

_VALID_IDS: set[str] = set()  # generation ids already checked against ID_PATTERN


def now_ms() -> int:
    """Wall-clock time in milliseconds since the epoch (the ``ts`` field)."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Event:
    """One event of a generation.

    ``seq`` counts 0, 1, 2 ... per generation (``start`` is 0). Fields that do not apply to a
    kind (see :data:`SCHEMA`) are left at their defaults and are not written.
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

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS

    def to_fields(self) -> dict[str, str]:
        """The Redis fields of this event, in order (for XADD; ``store/`` packs them)."""
        fields = {
            "v": WIRE_VERSION,
            "kind": self.kind,
            "gen": self.generation_id,
            "seq": str(self.seq),
            "ts": str(self.ts),
        }
        for spec in SCHEMA[self.kind]:
            value = getattr(self, spec.name)
            if spec.omit_default and value == DEFAULTS[spec.type]:
                continue
            if spec.type == "usage":
                fields[spec.name] = json.dumps(value, separators=(",", ":"))
            elif spec.type == "bool":
                fields[spec.name] = "1" if value else "0"
            else:
                fields[spec.name] = str(value)
        return fields

    def to_data(self) -> dict[str, Any]:
        """The JSON payload clients see (SSE ``data:``, WebSocket frames)."""
        data: dict[str, Any] = {"generation_id": self.generation_id, "seq": self.seq, "ts": self.ts}
        for spec in SCHEMA[self.kind]:
            value = getattr(self, spec.name)
            if spec.omit_default and value == DEFAULTS[spec.type]:
                continue
            data[spec.name] = value
        return data

    def data_json(self) -> str:
        """:meth:`to_data` as compact JSON, the ``data`` of SSE and WebSocket messages; a
        token's (the per-token path) is formatted directly, without building a dict."""
        if self.kind == "token" and plain_json(self.generation_id):
            text = self.text
            quoted = f'"{text}"' if plain_json(text) else json.dumps(text)
            return (
                f'{{"generation_id":"{self.generation_id}","seq":{self.seq},'
                f'"ts":{self.ts},"text":{quoted}}}'
            )
        return json.dumps(self.to_data(), separators=(",", ":"))


def plain_json(text: str) -> bool:
    """Whether JSON copies ``text`` unchanged between quotes (nothing to escape)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _text(fields: Mapping[bytes, bytes], name: bytes, required: bool = True) -> str:
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


def _int(fields: Mapping[bytes, bytes], name: bytes, required: bool = True) -> int:
    raw = fields.get(name)
    if raw is None:
        if required:
            raise InvalidEntry(f"missing field {name.decode()!r}")
        return 0
    if not raw.isdigit() or len(raw) > 19:
        raise InvalidEntry(f"field {name.decode()!r} must be a non-negative integer")
    return int(raw)


def _check_usage(usage: Any) -> dict[str, int]:
    if not isinstance(usage, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in usage.items()
    ):
        raise InvalidEntry("field 'usage' must be a JSON object of integers")
    return usage


def _usage(fields: Mapping[bytes, bytes], name: bytes) -> dict[str, int] | None:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        usage = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidEntry("field 'usage' is not JSON") from None
    return _check_usage(usage)


def _field_value(spec: FieldSpec, fields: Mapping[bytes, bytes], name: bytes) -> Any:
    if spec.type == "str":
        value: Any = _text(fields, name, spec.required)
        if spec.choices is not None and value not in spec.choices:
            raise InvalidEntry(f"unknown {spec.name} {value[:40]!r}")
        return value
    if spec.type == "int":
        return _int(fields, name, spec.required)
    if spec.type == "bool":
        return fields.get(name) in (b"1", b"true")
    return _usage(fields, name)


# Each kind's fields as (attribute, Redis field name as bytes, spec): precomputed for decode.
_DECODE = {
    kind: tuple((s.name, s.name.encode(), s) for s in specs) for kind, specs in SCHEMA.items()
}
_GEN_IDS: dict[bytes, str] = {}  # raw generation ids already checked, decoded


def _token(fields: Mapping[bytes, bytes]) -> Event | None:
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


def _generation_id(fields: Mapping[bytes, bytes]) -> str:
    generation_id = _text(fields, b"gen")
    if generation_id not in _VALID_IDS:
        if not ID_PATTERN.fullmatch(generation_id):
            raise InvalidEntry(f"invalid generation id {generation_id[:80]!r}")
        if len(_VALID_IDS) >= 4096:  # bounded: generation ids repeat for a while, then stop
            _VALID_IDS.clear()
            _GEN_IDS.clear()
        _VALID_IDS.add(generation_id)
        _GEN_IDS[fields[b"gen"]] = generation_id
    return generation_id


def decode_entry(fields: Mapping[bytes, bytes]) -> Event:
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
    event = Event(
        kind=kind,  # type: ignore[arg-type]  # checked against KINDS above
        generation_id=_generation_id(fields),
        seq=_int(fields, b"seq"),
        ts=_int(fields, b"ts"),
    )
    for attr, name, spec in _DECODE[kind]:
        setattr(event, attr, _field_value(spec, fields, name))
    return event


def event_from_data(item: Any, generation_id: str) -> Event:
    """An event from its JSON object (``{"kind", "seq", "ts", <kind's fields>}``, as in the
    pipeline entries); raises :class:`InvalidEntry` if it breaks :data:`SCHEMA`."""
    if not isinstance(item, dict):
        raise InvalidEntry("an event must be a JSON object")
    kind = item.get("kind")
    if kind not in KINDS:
        raise InvalidEntry(f"unknown kind {str(kind)[:40]!r}")
    event = Event(kind, generation_id, _json_int(item, "seq"), _json_int(item, "ts"))
    for spec in SCHEMA[kind]:
        setattr(event, spec.name, _json_value(spec, item))
    return event


def _json_int(item: Mapping[str, Any], name: str) -> int:
    value = item.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidEntry(f"event field {name!r} must be a non-negative integer")
    return value


def _json_value(spec: FieldSpec, item: Mapping[str, Any]) -> Any:
    if spec.name not in item and not spec.required:
        return DEFAULTS[spec.type]
    if spec.type == "int":
        return _json_int(item, spec.name)
    if spec.type == "bool":
        return item.get(spec.name) is True
    if spec.type == "usage":
        usage = item.get(spec.name)
        return None if usage is None else _check_usage(usage)
    value = item.get(spec.name)
    if not isinstance(value, str):
        raise InvalidEntry(f"event field {spec.name!r} must be a string")
    if spec.choices is not None and value not in spec.choices:
        raise InvalidEntry(f"unknown {spec.name} {value[:40]!r}")
    return value
