"""Pipeline entries: one per batch of events a producer flushes, for the processors to read.

The producer writes each flushed batch of a generation's events to the session stream (one
entry per event, for clients) and, in the same round trip, ONE entry to a pipeline stream (for
the processors): ``<prefix>:pipeline:<n>`` with ``n = crc32(session_id) % pipeline_shards``
(through a script that adds a batch once however often its round trip is retried:
``store/pipeline_add.py``; other producers may use a plain ``XADD``)::

    XADD tb:pipeline:2 MAXLEN ~ 100000 * v 1 sid s_1 gen g_1 model demo
         prompt_sha256 <hex, with the start event only>
         events '[{"kind":"start","seq":0,"ts":1700000000000,"model":"demo"},
                  {"kind":"token","seq":1,"ts":1700000000004,"text":"Hello"}]'

``events`` holds the batch's events as JSON objects with the wire field names of
docs/wire-format.md (``usage`` as an object, ``cached`` as a boolean). A batch's events belong
to one generation and have consecutive ``seq`` numbers, so ``(generation_id, first seq)``
names a batch uniquely: processors key their idempotence on it (:attr:`PipelineBatch.once_key`),
which also deduplicates an entry replayed from the dead letters under a new entry id.

:meth:`PipelineBatch.from_fields` is the one reader; it raises
:class:`~tokenbridge.exceptions.InvalidEntry` (and nothing else) for an entry that breaks the
format, so the consumer dead-letters it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.wire.events import Event, event_from_data
from tokenbridge.wire.keys import ID_PATTERN, Keys

__all__ = ["PipelineBatch", "PipelineHeader", "events_json", "prompt_digest", "shard_of"]

_MAX_EVENTS = 100_000
_MAX_MODEL = 256


def shard_of(session_id: str, shards: int) -> int:
    """The pipeline shard of a session: ``crc32(session_id) % shards``."""
    return zlib.crc32(session_id.encode()) % shards


def prompt_digest(messages: Sequence[Mapping[str, Any]]) -> str:
    """sha256 (hex) of a job's messages as canonical JSON (sorted keys, no spaces, UTF-8)."""
    canonical = json.dumps(
        [dict(m) for m in messages], sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _event_json(event: Event) -> str:
    if event.kind == "token":  # the hot path: only the text needs JSON escaping
        text = json.dumps(event.text)
        return f'{{"kind":"token","seq":{event.seq},"ts":{event.ts},"text":{text}}}'
    data = event.to_data()  # the fields clients see, minus the generation (the entry has it)
    del data["generation_id"]
    return json.dumps({"kind": event.kind, **data}, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class PipelineHeader:
    """The fields every pipeline entry of one generation starts with, and its stream.

    The producer packs them once per generation (``store/resp.py``); each entry adds
    ``events`` (:func:`events_json`) and, with the ``start`` event, ``prompt_sha256``.
    """

    key: str
    session_id: str
    generation_id: str
    model: str
    prompt_sha256: str

    @classmethod
    def of(
        cls, keys: Keys, session_id: str, generation_id: str, model: str, prompt_sha256: str,
        shards: int,
    ) -> PipelineHeader:  # fmt: skip
        key = keys.pipeline(shard_of(session_id, shards))
        return cls(key, session_id, generation_id, model, prompt_sha256)

    def fields(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"v", b"1"),
            (b"sid", self.session_id.encode()),
            (b"gen", self.generation_id.encode()),
            (b"model", self.model.encode()),
        ]


def events_json(events: Sequence[Event]) -> bytes:
    """The ``events`` field of a pipeline entry: the events as a JSON array."""
    return ("[" + ",".join(_event_json(e) for e in events) + "]").encode()


@dataclass(frozen=True, slots=True)
class PipelineBatch:
    """One pipeline entry: consecutive events of one generation, as the producer flushed them.

    ``prompt_sha256`` is set on the batch that holds the ``start`` event (sha256 of the job's
    messages, :func:`prompt_digest`), empty otherwise. ``shard`` is the pipeline stream it
    was read from.
    """

    session_id: str
    generation_id: str
    model: str
    events: tuple[Event, ...]
    prompt_sha256: str = ""
    shard: int = 0

    @property
    def first_seq(self) -> int:
        return self.events[0].seq

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq

    @property
    def once_key(self) -> str:
        """``<generation_id>:<first seq>``: unique per batch, the same on every delivery."""
        return f"{self.generation_id}:{self.events[0].seq}"

    @property
    def token_count(self) -> int:
        """Number of ``token`` events in the batch."""
        return sum(1 for e in self.events if e.kind == "token")

    @property
    def text(self) -> str:
        """The batch's token texts, concatenated in order."""
        return "".join(e.text for e in self.events if e.kind == "token")

    @property
    def start(self) -> Event | None:
        return next((e for e in self.events if e.kind == "start"), None)

    @property
    def first_token(self) -> Event | None:
        """The batch's first ``token`` event, if it holds one."""
        return next((e for e in self.events if e.kind == "token"), None)

    @property
    def terminal(self) -> Event | None:
        """The generation's ``end`` or ``error`` event, if this batch holds it."""
        last = self.events[-1]
        return last if last.kind in ("end", "error") else None

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes], shard: int = 0) -> PipelineBatch:
        """Decode a pipeline entry; raise :class:`InvalidEntry` if it breaks the format."""
        if fields.get(b"v") != b"1":
            raise InvalidEntry(f"unsupported pipeline entry version {fields.get(b'v')!r}")
        session_id = _id(fields, b"sid")
        generation_id = _id(fields, b"gen")
        model = _str(fields, b"model", required=False)[:_MAX_MODEL]
        prompt = _str(fields, b"prompt_sha256", required=False)
        try:
            raw = json.loads(fields.get(b"events", b""))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidEntry("field 'events' is not JSON") from None
        if not isinstance(raw, list) or not raw or len(raw) > _MAX_EVENTS:
            raise InvalidEntry(f"field 'events' must be a list of 1-{_MAX_EVENTS} events")
        events = tuple(event_from_data(item, generation_id) for item in raw)
        for before, after in itertools.pairwise(events):
            if after.seq != before.seq + 1:
                raise InvalidEntry("events of a pipeline entry must have consecutive seq")
        return cls(session_id, generation_id, model, events, prompt, shard)


def _str(fields: Mapping[bytes, bytes], name: bytes, required: bool = True) -> str:
    raw = fields.get(name)
    if raw is None:
        if required:
            raise InvalidEntry(f"missing field {name.decode()!r}")
        return ""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidEntry(f"field {name.decode()!r} is not UTF-8") from None


def _id(fields: Mapping[bytes, bytes], name: bytes) -> str:
    value = _str(fields, name)
    if not ID_PATTERN.fullmatch(value):
        raise InvalidEntry(f"invalid {name.decode()} {value[:80]!r}")
    return value
