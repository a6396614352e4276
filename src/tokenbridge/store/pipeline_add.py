"""Adding a batch's pipeline entry at most once, however often the round trip is retried.

The producer's round trip is the pipeline entry (for the processors), then the append script
(``store/live.py``). Each is one script, so all-or-nothing; a retry after a lost reply (or a
connection cut between the two) sends both again. The append script recognises its batch by
the progress record; this one by a marker per generation and pipeline stream holding the first
``seq`` of the last batch it added (``Keys.pipeline_written``, same slot as the stream): a batch
whose first ``seq`` is not past it was added already, and is not added twice.

The marker lives ``stream_max_generation_s`` while the generation runs, and after its last
batch only as long as that batch may still be retried (``redis_outage_s``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenbridge.store.resp import pack

__all__ = ["PIPELINE_ADD_SCRIPT", "PipelineAdd"]

PIPELINE_ADD_SCRIPT = """
local last = redis.call('GET', KEYS[2])
if last and tonumber(last) >= tonumber(ARGV[1]) then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"""

_SCRIPT = PIPELINE_ADD_SCRIPT.encode()


class PipelineAdd:
    """Packs the ``EVAL`` adding one pipeline entry of one generation.

    ``EVAL`` rather than ``EVALSHA``: at most one entry per generation every half second or
    256 events, and no ``NOSCRIPT`` to handle inside the producer's pipelined round trip."""

    __slots__ = ("_head", "_max_len")

    def __init__(self, key: bytes, marker: bytes, max_len: int) -> None:
        self._head = (_SCRIPT, b"2", key, marker)
        self._max_len = b"%d" % max_len

    def pack(self, first_seq: int, ttl_s: int, fields: Sequence[tuple[bytes, bytes]]) -> bytes:
        flat = [value for pair in fields for value in pair]
        return pack(b"EVAL", *self._head, b"%d" % first_seq, b"%d" % ttl_s, self._max_len, *flat)
