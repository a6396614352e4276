"""GenerationSweeper: every generation ends, even when its producer is gone for good.

A worker registers each generation it runs in the index ``<prefix>:running`` (sorted set,
member ``<session> <generation>``, score: the time by which it will have refreshed it) and
refreshes it every heartbeat; it removes it once the terminal event is written. A generation
whose worker died is normally ended by the worker that reclaims its job (``worker_lost``,
``producer/worker.py``). What that cannot catch is ended here: a job dead-lettered after
killing its workers, a job lost from the job stream, a producer whose write failed while
Redis was away (the worker re-registers those after a reconnect, even into a Redis that came
back empty). One sweeper task per worker process, every heartbeat, takes up to
``_BATCH`` members whose deadline has passed and ends each with one Lua script, a
check-and-set on the generation's progress record (``<prefix>:{sid}:gens``): only a
generation still ``running`` (or with no record, and no terminal event at the stream's tail)
gets ``error`` with code ``generation_lost``, right after the generation's last event actually
in the stream (the record's ``seq``, or a later one found in the stream's last ``_TAIL``
entries), announced on the session's live channel like any write (an empty ``SPUBLISH``: "read
the stream"). A reclaiming worker writes its ``worker_lost`` with the same script
(:meth:`GenerationSweeper.end_lost`), and a producer's append script refuses to write after a
``done`` record it did not write itself (``store/live.py``): two sweepers, a sweeper and a
reclaiming worker, or either and a producer still alive, never write two terminal events.

Whoever wins adds the generation's last pipeline entry (:meth:`GenerationSweeper.add_to_pipeline`),
so the processors count it as ended with its code: a second call (on a cluster the pipeline
shard is another slot), once through the pipeline marker (``store/pipeline_add.py``). A call
finding the generation already ended as lost (a retry after a lost reply) adds it too, once.

Bound: a generation whose producer stopped gets its terminal event within
``deadline_s = 2 x consumer_claim_idle_ms + consumer_heartbeat_s`` plus one heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbridge.exceptions import InvalidEntry
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.store.pipeline_add import PIPELINE_LOST_SCRIPT, closed_seq
from tokenbridge.tasks import run_every
from tokenbridge.wire.events import Event, decode_entry, now_ms
from tokenbridge.wire.keys import Keys
from tokenbridge.wire.pipeline import events_json, shard_of

__all__ = ["LOST_CODE", "GenerationSweeper"]

log = logging.getLogger(__name__)

LOST_CODE = "generation_lost"
_BATCH = 100  # generations ended per sweep at most: bounded work per heartbeat
_TAIL = 256  # entries of the stream's tail searched for the generation's last event
_UNPIPED = 2048  # entries of the tail searched for the events not yet in the pipeline
_MESSAGE = "the generation stopped and cannot continue (its worker or its job was lost)"

_END_LOST = """
local gens, events, meta, live, gid = KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1]
local record = redis.call('HGET', gens, gid)
local last, ended = -1, false
if record then
  local state, seq = string.match(record, '^(%a+) (%-?%d+)')
  if state == 'done' then ended = true elseif state ~= 'running' then return {-1, 0} end
  last = tonumber(seq)
end
-- the last event of this generation actually in the stream (a bounded look at the tail)
local tail = redis.call('XREVRANGE', events, '+', '-', 'COUNT', ARGV[7])
for _, entry in ipairs(tail) do
  local f, t = entry[2], {}
  for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
  if t['gen'] == gid then
    local seq = tonumber(t['seq']) or -1
    if ended then
      -- ended as lost already (a retry, or a second sweeper): its pipeline entry may be due
      if t['kind'] == 'error' and seq == last
          and (t['code'] == 'generation_lost' or t['code'] == 'worker_lost') then
        return {seq, 0}
      end
      return {-1, 0}
    end
    if t['kind'] == 'end' or t['kind'] == 'error' then
      redis.call('HSET', gens, gid, 'done ' .. seq)
      return {-1, 0}
    end
    if seq > last then last = seq end
    break
  end
end
if ended then return {-1, 0} end
local seq = last + 1
redis.call('XADD', events, 'MAXLEN', '~', ARGV[3], '*', 'v', '1', 'kind', 'error', 'gen', gid,
  'seq', tostring(seq), 'ts', ARGV[4], 'code', ARGV[5], 'message', ARGV[6])
-- 'lost' marks whose end this is: a producer's retry of a batch that also ended at seq is
-- then told 'ended', not 'applied' (store/append.lua)
redis.call('HSET', gens, gid, 'done ' .. seq .. ' lost')
redis.call('SPUBLISH', live, '')
for _, key in ipairs({gens, events, meta}) do
  if redis.call('EXISTS', key) == 1 then redis.call('EXPIRE', key, ARGV[2]) end
end
return {seq, 1}
"""


class GenerationSweeper:
    """Ends generations whose producer is gone (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        deadline_s: float,
        interval_s: float,
        retention_s: int,
        stream_max_len: int,
        pipeline_shards: int = 0,
        pipeline_max_len: int = 100_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.deadline_s = deadline_s
        self.interval_s = interval_s
        self.retention_s = retention_s
        self.stream_max_len = stream_max_len
        self.pipeline_shards = pipeline_shards  # 0: no pipeline entries
        self.pipeline_max_len = pipeline_max_len
        self.ended = 0
        self._script: AsyncScript = redis.register_script(_END_LOST)
        self._pipeline_script: AsyncScript = redis.register_script(PIPELINE_LOST_SCRIPT)

    def __repr__(self) -> str:
        return f"<GenerationSweeper ended={self.ended}>"

    async def register(self, pairs: Iterable[tuple[str, str]], due_now: bool = False) -> None:
        """Add or refresh ``(session_id, generation_id)`` pairs; ``due_now``: only add missing
        ones, due at once (generations whose producer failed)."""
        members = {f"{sid} {gid}": now_ms() for sid, gid in pairs}
        if not members:
            return
        if due_now:
            await self.redis.zadd(self.keys.running, members, nx=True)
            return
        deadline = now_ms() + int(self.deadline_s * 1000)
        await self.redis.zadd(self.keys.running, dict.fromkeys(members, deadline))

    async def done(self, session_id: str, generation_id: str) -> None:
        """The generation's terminal event is written: forget it."""
        await self.redis.zrem(self.keys.running, f"{session_id} {generation_id}")

    async def run(self) -> None:
        """Sweep every ``interval_s`` until cancelled; Redis errors wait for the next sweep."""
        await run_every(self.interval_s, self.sweep, "generation sweep", log)

    async def sweep(self) -> int:
        """End the generations whose deadline passed; returns how many this call ended."""
        due: Any = await self.redis.zrangebyscore(
            self.keys.running, "-inf", now_ms(), start=0, num=_BATCH
        )
        ended = 0
        for raw in due:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            session_id, _, generation_id = member.partition(" ")
            try:
                if generation_id and await self.end_lost(session_id, generation_id) >= 0:
                    ended += 1
            except REDIS_DOWN_ERRORS:
                raise
            except Exception as exc:  # one bad record must not stop the sweeps (or the worker)
                log.warning("generation sweep failed member=%r error=%r", member, exc)
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.redis.zrem(self.keys.running, member)
        return ended

    async def end_lost(
        self,
        session_id: str,
        generation_id: str,
        code: str = LOST_CODE,
        message: str = _MESSAGE,
        model: str = "",
    ) -> int:
        """Write ``error <code>`` unless the generation has ended; its seq, or -1.

        Then its pipeline entry, for the processors (:meth:`add_to_pipeline`): whoever wins
        the check-and-set, or a later call finding the generation ended as lost (a retry
        after a lost reply), adds it; the pipeline marker makes it once."""
        k = self.keys
        keys = [
            k.generations(session_id), k.events(session_id), k.meta(session_id),
            k.live(session_id),
        ]  # fmt: skip
        args: list[str | int] = [
            generation_id,
            self.retention_s,
            self.stream_max_len,
            now_ms(),
            code,
            message,
            _TAIL,
        ]
        seq, fresh = (int(x) for x in await self._script(keys=keys, args=args))
        if seq >= 0 and fresh:
            self.ended += 1
            log.warning(
                "generation ended as lost session=%s generation=%s seq=%d code=%s",
                session_id, generation_id, seq, code,
            )  # fmt: skip
        if seq >= 0 and self.pipeline_shards:
            await self.add_to_pipeline(session_id, generation_id, seq, model)
        return seq if fresh else -1

    async def add_to_pipeline(
        self, session_id: str, generation_id: str, seq: int, model: str = ""
    ) -> bool:
        """Add the pipeline entry of a generation ended as lost at ``seq``: the events the
        producer had not added yet, and the terminal ``error`` (``store/pipeline_add.py``).
        True if this call added it."""
        key = self.keys.pipeline(shard_of(session_id, self.pipeline_shards))
        marker = self.keys.pipeline_written(key, generation_id)
        for _ in range(3):  # a batch racing in (a producer still alive) makes it look again
            raw: Any = await self.redis.get(marker)
            if closed_seq(raw) is not None:
                return False
            added = -1 if raw is None else int(raw)
            if added >= seq:  # the producer's own last batch got there first: it ends it
                log.info("generation lost: its producer's end is in the pipeline already "
                         "session=%s generation=%s", session_id, generation_id)  # fmt: skip
                return False
            events = await self._unpiped(session_id, generation_id, added, seq)
            if not events:
                log.warning(
                    "generation lost: its terminal event left the stream before its pipeline "
                    "entry was added session=%s generation=%s", session_id, generation_id,
                )  # fmt: skip
                return False
            start = events[0] if events[0].kind == "start" else None
            fields: list[Any] = [
                "v", "1", "sid", session_id, "gen", generation_id,
                "model", model or (start.model if start else ""),
                "events", events_json(events),
            ]  # fmt: skip
            args: list[Any] = [raw or b"", seq, self.retention_s, self.pipeline_max_len]
            reply = int(await self._pipeline_script(keys=[key, marker], args=[*args, *fields]))
            if reply >= 0:
                return reply == 1
        log.warning("generation lost: no pipeline entry added generation=%s", generation_id)
        return False

    async def _unpiped(
        self, session_id: str, generation_id: str, added: int, seq: int
    ) -> list[Event]:
        """The generation's events after ``added`` up to its terminal ``seq``, from the
        stream's tail: the run of consecutive ones ending with the terminal event."""
        tail: Any = await self.redis.xrevrange(
            self.keys.events(session_id), "+", "-", count=_UNPIPED
        )
        gid = generation_id.encode()
        run: list[Event] = []
        for _, fields in tail:
            if fields.get(b"gen") != gid:
                continue
            try:
                event = decode_entry(fields)
            except InvalidEntry:
                break
            if event.seq > seq:
                continue
            if event.seq <= added or event.seq != (run[-1].seq - 1 if run else seq):
                break
            run.append(event)
        run.reverse()
        return run if run and run[-1].kind == "error" else []
