"""Adding a batch's pipeline entry at most once, however often the round trip is retried.

The producer's round trip is the pipeline entry (for the processors), then the append script
(``store/live.py``). Each is one script, so all-or-nothing; a retry after a lost reply (or a
connection cut between the two) sends both again. The append script recognises its batch by
the progress record; this one by a marker per generation and pipeline stream holding the last
``seq`` of the last batch it added (``Keys.pipeline_written``, same slot as the stream): a batch
whose first ``seq`` is not past it was added already, and is not added twice.

The marker lives ``stream_max_generation_s`` while the generation runs, and after its last
batch only as long as that batch may still be retried (``redis_outage_s``).

A generation ended as lost (``worker_lost``, ``generation_lost``: ``producer/sweeper.py``)
gets its last entry through :data:`PIPELINE_LOST_SCRIPT`: the events the producer wrote to the
session stream but not yet to the pipeline, and the terminal ``error``. It *closes* the
marker (``x<terminal seq>``, kept the session's retention): a retry adds nothing, and neither
does a batch of a producer still alive whose append is then refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenbridge.store.resp import pack

__all__ = ["PIPELINE_ADD_SCRIPT", "PIPELINE_LOST_SCRIPT", "PipelineAdd", "closed_seq"]

PIPELINE_ADD_SCRIPT = """
local last = redis.call('GET', KEYS[2])
if last and (string.sub(last, 1, 1) == 'x' or tonumber(last) >= tonumber(ARGV[1])) then
  return 0
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: stream, marker. ARGV: the marker as read (or ''), terminal seq, ttl, max len, fields.
# 0: added before (closed); -1: a batch came in since the marker was read: read it again.
PIPELINE_LOST_SCRIPT = """
local last = redis.call('GET', KEYS[2]) or ''
if string.sub(last, 1, 1) == 'x' then return 0 end
if last ~= ARGV[1] then return -1 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 5))
redis.call('SET', KEYS[2], 'x' .. ARGV[2], 'EX', ARGV[3])
return 1
"""

_SCRIPT = PIPELINE_ADD_SCRIPT.encode()


def closed_seq(marker: bytes | str | None) -> int | None:
    """The terminal ``seq`` of a marker closed by a lost end, else None."""
    text = marker.decode() if isinstance(marker, bytes) else marker
    return int(text[1:]) if text and text.startswith("x") else None


class PipelineAdd:
    """Packs the ``EVAL`` adding one pipeline entry of one generation.

    ``EVAL`` rather than ``EVALSHA``: at most one entry per generation every half second or
    256 events, and no ``NOSCRIPT`` to handle inside the producer's pipelined round trip."""

    __slots__ = ("_head", "_max_len")

    def __init__(self, key: bytes, marker: bytes, max_len: int) -> None:
        self._head = (_SCRIPT, b"2", key, marker)
        self._max_len = b"%d" % max_len

    def pack(
        self, first_seq: int, last_seq: int, ttl_s: int, fields: Sequence[tuple[bytes, bytes]]
    ) -> bytes:
        flat = [value for pair in fields for value in pair]
        return pack(
            b"EVAL", *self._head, b"%d" % first_seq, b"%d" % last_seq, b"%d" % ttl_s,
            self._max_len, *flat,
        )  # fmt: skip
