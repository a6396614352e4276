"""Appending a batch of events and announcing it live, in one script call (one slot).

``APPEND_SCRIPT`` (``append.lua`` beside this module) is the producer's contract with every
gateway, standalone or Cluster: for one batch of one session it ``XADD``s every event to
``<prefix>:{sid}:events``, then ``SPUBLISH``es one message on the session's shard channel
``<prefix>:{sid}:live`` carrying the entries themselves, so a gateway delivers them without
reading the stream. The stream, ``:meta``, ``:gens`` and the channel share the session's hash
tag, so the script is one slot on a cluster.

The message is RESP (what ``XRANGE`` would return, framed), parsed in C by hiredis::

    [epoch, prev_id, [[entry_id, [field, value, ...]], ...]]

``prev_id`` is the id of the stream's last entry before the batch ("0-0": none), so a gateway
that delivered up to ``prev_id`` knows it missed nothing; any other value means a gap, repaired
from the stream. ``epoch`` tells a renewed stream apart.

The failover check: the producer passes the ``:gens`` record its previous batch wrote. If the
record differs, that batch is gone (an asynchronous failover lost it): the script then gives the
session a new epoch, so every client resuming across the loss gets a ``gap`` event rather than a
silent hole. A batch whose state is already the record was written before (a retry after a
lost reply): the script does nothing and answers ``applied``. A record ``done <seq>`` that is
not this batch's means someone else ended the generation (a worker that took the job over
wrote ``worker_lost``, a sweeper ``generation_lost``): the script writes nothing and answers
``ended``, and the producer stops, so a stream never holds two terminal events. Each producer's
states carry a token of its own (``running <seq> <token>``), so only its own retry ever
matches its record; a first batch (no previous record passed) meeting a record with another
writer's token is refused the same way: another writer began the generation (a job delivered
twice, e.g. its submission retried after a lost reply). Writers that send no token are never
refused so.

Trimming (``ARGV[1]``): ``<count>`` trims every ``XADD`` to ``MAXLEN ~ <count>``;
``<count> <history s> <hard max>`` keeps every entry younger than ``<history s>`` (up to
``MAXLEN ~ <hard max>``) and, past ``<count>`` entries, trims the older ones (``XTRIM MINID ~
<now - history> LIMIT <excess>``: never below ``<count>``), so a fast session keeps the history
a dropped reader comes back for (settings ``stream_max_len``, ``stream_history_s``,
``stream_history_max_len``).

The reply is ``[cancel, epoch, lost, last id, readers]``: ``readers`` is what ``SPUBLISH``
answered, the number of gateway processes subscribed to the session's channel (on a cluster,
on the slot's primary, where every gateway subscribes); ``-1`` when nothing was published
(``applied``, ``ended``). A worker's orphan rule reads it (``producer/orphans.py``): no
per-session command says that someone reads.

An empty message (``SPUBLISH <channel> ""``) means "read the stream": producers that only
``XADD`` (docs/wire-format.md) announce their writes that way.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from tokenbridge.store.client import (
    REDIS_DOWN_ERRORS,
    is_cluster,
    is_moved,
    is_noscript,
    node_connection,
)
from tokenbridge.store.resp import arg, pack

__all__ = [
    "APPEND_RETRY_ERRORS",
    "APPEND_SCRIPT",
    "APPEND_SHA",
    "AppendCommand",
    "AppendResult",
    "LiveMessage",
    "append_events",
    "channel_readers",
    "pack_append",
    "parse_live_message",
    "send_append",
]

APPEND_SCRIPT = (resources.files("tokenbridge.store") / "append.lua").read_text(encoding="utf-8")
"""The script: ``append.lua``, package data beside this module (docs/wire-format.md links to it
for producers in other languages)."""

APPEND_RETRY_ERRORS: tuple[type[BaseException], ...] = (
    *REDIS_DOWN_ERRORS,
    ClusterDownError,
    TryAgainError,
)
"""Errors after which a batch may be sent again (a failover, a node restarting): the
script recognises a batch it already wrote by the state it records."""

APPEND_SHA = hashlib.sha1(APPEND_SCRIPT.encode()).hexdigest().encode()

_HEAD = arg(b"EVALSHA") + arg(APPEND_SHA) + arg(b"4")


def pack_append(
    keys: tuple[bytes, bytes, bytes, bytes],
    head_args: tuple[bytes, ...],
    packed_events: list[bytes],
    fields_count: int,
) -> bytes:
    """``EVALSHA`` of :data:`APPEND_SCRIPT` as RESP bytes.

    ``head_args`` are ARGV 1-7 (maxlen, generation, state, expected state, ttl, new epoch,
    meta ttl); each of ``packed_events`` is one event already packed as RESP bulk strings:
    its field count, then its fields and values (``fields_count`` bulk strings in all, counts
    included)."""
    argc = 3 + 4 + len(head_args) + 1 + fields_count
    return b"*%d\r\n%b%b%b%b%b" % (
        argc,
        _HEAD,
        b"".join(arg(k) for k in keys),
        b"".join(arg(a) for a in head_args),
        arg(b"%d" % len(packed_events)),
        b"".join(packed_events),
    )


@dataclass(slots=True)
class LiveMessage:
    """One published batch: its epoch, the id before it, and its raw entries (as XRANGE)."""

    epoch: str
    prev_id: str
    entries: list[tuple[bytes, dict[bytes, bytes]]]


class _Readers(threading.local):
    """One reusable reader per thread (gateways of tests and embeddings may share a process):
    a message is fed and read back without an await, so within a thread they never mix."""

    reader: hiredis.Reader

    def __init__(self) -> None:
        self.reader = hiredis.Reader()


_READERS = _Readers()


def parse_live_message(data: bytes) -> LiveMessage | None:
    """The message's content; None for an empty message ("read the stream") or a malformed
    one (the caller repairs from the stream either way)."""
    if not data:
        return None
    reader = _READERS.reader
    reader.feed(data)
    try:
        reply: Any = reader.gets()
    except hiredis.ProtocolError:
        reply = False
    if reply is False or reader.has_data():  # malformed, cut short or trailing bytes
        _READERS.reader = hiredis.Reader()
        if reply is False:
            return None
    if not isinstance(reply, list) or len(reply) != 3 or not isinstance(reply[2], list):
        return None
    entries = []
    for item in reply[2]:
        raw_id, flat = item
        it = iter(flat)
        entries.append((raw_id, dict(zip(it, it, strict=False))))
    return LiveMessage(reply[0].decode(), reply[1].decode(), entries)


@dataclass(slots=True)
class AppendResult:
    """The script's answer: the cancel flag, the epoch, whether a loss was found, last id
    (``applied``: written before; ``ended``: someone else ended the generation), and the
    gateway processes the batch was published to (``-1``: not published; a script loaded by
    an older version answers without it)."""

    cancel: bool
    epoch: str
    lost: bool
    last_id: str
    readers: int = -1

    @property
    def ended(self) -> bool:
        return self.last_id == "ended"

    @classmethod
    def from_reply(cls, reply: Any) -> AppendResult:
        cancel, epoch, lost, last_id, *rest = reply
        readers = int(rest[0]) if rest else -1
        return cls(bool(cancel), _text(epoch), int(lost) == 1, _text(last_id), readers)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def append_events(
    redis: Any,
    keys: tuple[str, str, str, str],
    generation_id: str,
    events: list[dict[str, str]],
    *,
    state: str,
    expected_state: str = "",
    ttl_s: int | None = None,
    new_epoch: str,
    meta_ttl_s: int = 3600,
    maxlen: int | str = 100_000,
) -> AppendResult:
    """Run :data:`APPEND_SCRIPT` through redis-py (routed by key on a cluster, NOSCRIPT
    handled): ``keys`` are (events, meta, gens, live channel); each event is its fields."""
    args: list[str | int] = [
        maxlen, generation_id, state, expected_state, "" if ttl_s is None else ttl_s,
        new_epoch, meta_ttl_s, len(events),
    ]  # fmt: skip
    for fields in events:
        args.append(2 * len(fields))
        for name, value in fields.items():
            args += [name, value]
    try:
        reply = await redis.evalsha(APPEND_SHA.decode(), 4, *keys, *args)
    except NoScriptError:
        reply = await redis.eval(APPEND_SCRIPT, 4, *keys, *args)
    return AppendResult.from_reply(reply)


class AppendCommand:
    """The producer's hot path: :data:`APPEND_SCRIPT` calls of one generation, hand-packed.

    The keys, the trim (``maxlen``: a count, or ``b"<count> <history s> <hard max>"``) and a
    token's constant fields (``v``, ``kind``, ``gen``) are packed once; per token only its
    values (``seq``, ``ts``, ``text``) are packed."""

    __slots__ = ("_head", "_maxlen", "_names", "_token_bulks", "_token_head", "events_key")

    def __init__(
        self,
        keys: tuple[bytes, bytes, bytes, bytes],
        generation_id: bytes,
        maxlen: int | bytes,
        token_constant: Sequence[tuple[bytes, bytes]],
        token_names: Sequence[bytes],
    ) -> None:
        self.events_key = keys[0]
        self._head = _HEAD + b"".join(arg(k) for k in keys)
        trim = maxlen if isinstance(maxlen, bytes) else b"%d" % maxlen  # ARGV[1]
        self._maxlen = arg(trim) + arg(generation_id)
        fields = 2 * (len(token_constant) + len(token_names))
        constant = [arg(v) for pair in token_constant for v in pair]
        self._token_head = arg(b"%d" % fields) + b"".join(constant)
        self._token_bulks = 1 + fields
        self._names = [arg(name) for name in token_names]

    def token(self, *values: bytes) -> tuple[bytes, int]:
        """One token event (its values in the order of ``token_names``): packed bytes and
        how many bulk strings they are."""
        packed = [name + arg(value) for name, value in zip(self._names, values, strict=True)]
        return self._token_head + b"".join(packed), self._token_bulks

    @staticmethod
    def event(fields: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, int]:
        """Any event, from its fields."""
        flat = [arg(v) for pair in fields for v in pair]
        return arg(b"%d" % len(flat)) + b"".join(flat), 1 + len(flat)

    def pack(
        self,
        events: Sequence[tuple[bytes, int]],
        state: bytes,
        expected_state: bytes,
        ttl_s: int | None,
        new_epoch: bytes,
        meta_ttl_s: int,
    ) -> bytes:
        """The ``EVALSHA`` of one batch."""
        tail = [state, expected_state, b"" if ttl_s is None else b"%d" % ttl_s, new_epoch]
        tail += [b"%d" % meta_ttl_s, b"%d" % len(events)]
        argc = 3 + 4 + 2 + len(tail) + sum(n for _, n in events)
        return b"*%d\r\n%b%b%b%b" % (
            argc,
            self._head,
            self._maxlen,
            b"".join(arg(a) for a in tail),
            b"".join(e for e, _ in events),
        )


async def send_append(
    redis: Any, before: Sequence[tuple[bytes, bytes]], append: AppendCommand, command: bytes
) -> tuple[list[Any], AppendResult]:
    """Send ``before`` (``(key, packed command)`` pairs: the pipeline entry) and then the
    append ``command``: one round trip on standalone Redis, one per node on a cluster.

    A node without the script gets it (``SCRIPT LOAD``) and the append alone is sent again;
    on a cluster a ``MOVED`` refreshes the slot map and an ``ASK`` is followed, then the
    command is sent again (an error reply means the command did nothing)."""
    if not is_cluster(redis):
        async with node_connection(redis, append.events_key) as conn:
            await conn.send_packed_command(b"".join([c for _, c in before] + [command]), False)
            replies = [await _reply(conn) for _ in range(len(before) + 1)]
            for reply in replies[:-1]:
                if isinstance(reply, Exception):
                    raise reply
            if isinstance(replies[-1], Exception) and is_noscript(replies[-1]):
                replies[-1] = await _load_and_send(conn, command)
            if isinstance(replies[-1], Exception):
                raise replies[-1]
            return replies[:-1], AppendResult.from_reply(replies[-1])
    try:
        first = [await _routed(redis, key, packed, script=False) for key, packed in before]
        reply = await _routed(redis, append.events_key, command, True)
    except REDIS_DOWN_ERRORS:
        # A node went away: reload the slot map, so that the caller's next try goes to the
        # replica that takes over (once it has).
        with contextlib.suppress(*REDIS_DOWN_ERRORS, ResponseError):
            await redis.nodes_manager.initialize()
        raise
    return first, AppendResult.from_reply(reply)


async def _reply(conn: Any) -> Any:
    try:
        return await conn.read_response(disconnect_on_error=True)
    except ResponseError as exc:
        return exc


async def _load_and_send(conn: Any, command: bytes) -> Any:
    await conn.send_packed_command(pack(b"SCRIPT", b"LOAD", APPEND_SCRIPT.encode()), False)
    await conn.send_packed_command(command, False)
    loaded = await _reply(conn)
    if isinstance(loaded, Exception):
        raise loaded
    return await _reply(conn)


async def _routed(redis: Any, key: bytes, command: bytes, script: bool) -> Any:
    """One command to the node serving ``key`` on a cluster, following redirections."""
    asking: tuple[str, int] | None = None
    for _ in range(5):
        async with node_connection(redis, key, asking) as conn:
            if asking is not None:
                await conn.send_packed_command(pack(b"ASKING") + command, False)
                await _reply(conn)
            else:
                await conn.send_packed_command(command, False)
            reply = await _reply(conn)
            if script and isinstance(reply, Exception) and is_noscript(reply):
                reply = await _load_and_send(conn, (pack(b"ASKING") if asking else b"") + command)
                if asking is not None and not isinstance(reply, Exception):
                    reply = await _reply(conn)
        if not (isinstance(reply, Exception) and is_moved(reply)):
            if isinstance(reply, Exception):
                raise reply
            return reply
        if isinstance(reply, AskError) and not isinstance(reply, MovedError):
            asking = (reply.host, int(reply.port))
        else:
            asking = None
            await redis.nodes_manager.initialize()
    raise reply


async def channel_readers(redis: Any, channels: Sequence[bytes]) -> list[int]:
    """How many gateway processes are subscribed to each shard channel: ``PUBSUB
    SHARDNUMSUB`` on the node that serves the channel's slot (one command for all of them on
    standalone Redis, one per channel on a cluster, whose counts are per node)."""
    if not channels:
        return []
    if not is_cluster(redis):
        reply: Any = await redis.execute_command("PUBSUB", "SHARDNUMSUB", *channels)
        if reply and isinstance(reply[0], (tuple, list)):  # parsed into (channel, n) pairs
            return [int(n) for _, n in reply]
        return [int(n) for n in reply[1::2]]
    counts = []
    for channel in channels:
        reply = await _routed(redis, channel, pack(b"PUBSUB", b"SHARDNUMSUB", channel), False)
        counts.append(int(reply[1]))
    return counts
