"""LoggingProcessor: one structured record per finished generation, to a durable sink.

A record holds the session, generation and model, the sha256 of the prompt's messages (never
the prompt), the full answer text, the token count, the timings (start, first token, end,
TTFT, duration, tokens/s) and the outcome (``stop``, ``length``, ``cancelled`` or ``error``
with its code and message). Nothing else: no API key, no setting, no request header.

While a generation runs, its text waits in Redis, not in process memory: each batch's text
goes into a hash of the session's slot (``<prefix>:{sid}:glog:<gid>``, field ``c:<first seq>``,
``HSETNX``, so a redelivered batch changes nothing), with the start, first token and terminal
details. A crash mid-generation loses nothing; the hash expires with the generation's safety
TTL if it never completes. The generation is complete when ``terminal seq + 1`` events were
counted, whatever the order the batches arrived in; then the text is assembled (at most
1,000,000 characters) and written to the sink, and the hash shrinks to a ``logged`` marker.

Sinks:

* default: the capped Redis stream ``<prefix>:log`` (``XADD MAXLEN ~ generation_log_max_len``),
  one entry of flat string fields per generation, written exactly once: one script sets the
  marker ``<prefix>:log:once:{<prefix>:log}:<gid>`` (same Cluster slot as ``<prefix>:log``,
  kept ``processors_once_ttl_s``) and appends;
* ``generation_log_path``: JSON lines appended to that file (one ``write`` per line; rotate it
  with ``copytruncate`` or by moving it: each record reopens the file). At least once: a crash
  between the write and the ``logged`` marker repeats the record on redelivery; readers dedupe
  on ``generation_id``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from tokenbridge.processors.analytics import GenerationFigures
from tokenbridge.processors.batcher import (
    ScriptCall,
    follow_up_each,
    process_one,
    run_script_group,
)
from tokenbridge.settings import Settings
from tokenbridge.text import as_text
from tokenbridge.wire.events import now_ms
from tokenbridge.wire.keys import Keys
from tokenbridge.wire.pipeline import PipelineBatch

__all__ = ["LoggingProcessor", "read_log"]

log = logging.getLogger(__name__)

_MAX_TEXT = 1_000_000

_BUFFER = """
local buf = KEYS[1]
if redis.call('HEXISTS', buf, 'logged') == 1 then return 0 end
if redis.call('HSETNX', buf, 'c:' .. ARGV[2], ARGV[4]) == 1 then
  redis.call('HINCRBY', buf, 'events', ARGV[3])
  redis.call('HINCRBY', buf, 'token_events', ARGV[5])
  if ARGV[6] ~= '' then redis.call('HSETNX', buf, 'model', ARGV[6]) end
  if ARGV[7] ~= '' then
    redis.call('HSET', buf, 'start_ts', ARGV[7], 'prompt_sha256', ARGV[8], 'cached', ARGV[9])
  end
  if ARGV[10] ~= '' then
    local seq = redis.call('HGET', buf, 'first_seq')
    if (not seq) or tonumber(ARGV[10]) < tonumber(seq) then
      redis.call('HSET', buf, 'first_seq', ARGV[10], 'first_ts', ARGV[11])
    end
  end
  if ARGV[12] ~= '' then
    redis.call('HSET', buf, 'last_seq', ARGV[12], 'end_ts', ARGV[13], 'terminal', ARGV[14])
  end
  redis.call('PEXPIRE', buf, ARGV[1])
end
local last = redis.call('HGET', buf, 'last_seq')
if last and tonumber(redis.call('HGET', buf, 'events')) >= tonumber(last) + 1 then return 1 end
return 0
"""

_APPEND_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
"""


def _n(value: str | None) -> int | None:
    return int(value) if value else None


def _terminal_json(batch: PipelineBatch) -> str:
    terminal = batch.terminal
    if terminal is None:
        return ""
    if terminal.kind == "end":
        data: dict[str, Any] = {"reason": terminal.reason, "tokens": terminal.tokens}
        if terminal.usage is not None:
            data["usage"] = terminal.usage
    else:
        data = {"code": terminal.code, "message": terminal.message}
    return json.dumps(data, separators=(",", ":"))


def build_record(session_id: str, generation_id: str, buffer: Mapping[str, str]) -> dict[str, Any]:
    """The log record of a complete generation from its buffer hash (decoded)."""
    chunks = sorted(
        (int(k[2:]), v) for k, v in buffer.items() if k.startswith("c:") and k[2:].isdigit()
    )
    text = "".join(v for _, v in chunks)
    truncated = len(text) > _MAX_TEXT
    terminal = json.loads(buffer.get("terminal") or "{}")
    usage = terminal.get("usage")
    token_events = int(buffer.get("token_events", "0") or 0)
    if "code" in terminal:
        outcome, tokens = f"error:{terminal['code']}", token_events
    else:
        outcome = terminal.get("reason", "")
        completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
        tokens = completion if isinstance(completion, int) else token_events
    figures = GenerationFigures.compute(
        buffer.get("model", ""),
        outcome,
        tokens,
        _n(buffer.get("start_ts")),
        _n(buffer.get("first_ts")),
        _n(buffer.get("end_ts")),
    )
    record: dict[str, Any] = {
        "v": 1,
        "generation_id": generation_id,
        "session_id": session_id,
        "model": figures.model,
        "prompt_sha256": buffer.get("prompt_sha256", ""),
        "outcome": "error" if "code" in terminal else outcome,
        "reason": terminal.get("reason"),
        "error_code": terminal.get("code"),
        "error_message": terminal.get("message"),
        "tokens": tokens,
        "token_events": token_events,
        "usage": usage,
        "cached": buffer.get("cached") == "1",
        "start_ms": _n(buffer.get("start_ts")),
        "first_token_ms": _n(buffer.get("first_ts")),
        "end_ms": _n(buffer.get("end_ts")),
        "ttft_ms": figures.ttft_ms,
        "duration_ms": figures.duration_ms,
        "tokens_per_s": None if figures.tokens_per_s is None else round(figures.tokens_per_s, 3),
        "text": text[:_MAX_TEXT],
        "text_truncated": truncated,
        "logged_ms": now_ms(),
    }
    return {k: v for k, v in record.items() if v is not None}


def _flat(record: Mapping[str, Any]) -> list[str]:
    """A record as XADD field/value strings (bools 1/0, objects as JSON)."""
    out: list[str] = []
    for key, value in record.items():
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, dict):
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = str(value)
        out += [key, text]
    return out


class LoggingProcessor:
    """Writes one record per finished generation to the Redis log stream or a JSONL file."""

    name = "logging"

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.stream = keys.log
        self.once_ttl_ms = settings.once_ttl_ms()
        self.max_len = settings.generation_log_max_len
        self.path = settings.generation_log_path
        self.buffer_ttl_ms = (settings.stream_max_generation_s + settings.stream_retention_s) * 1000
        self._buffer: AsyncScript = redis.register_script(_BUFFER)
        self._append: AsyncScript = redis.register_script(_APPEND_ONCE)
        self.logged = 0

    def __repr__(self) -> str:
        sink = self.path or self.stream
        return f"<LoggingProcessor sink={sink} logged={self.logged}>"

    def buffer_key(self, session_id: str, generation_id: str) -> str:
        return self.keys.generation_log(session_id, generation_id)

    async def process(self, batch: PipelineBatch, entry_id: str) -> None:
        """Buffer ``batch``'s text; write the record once its generation is complete."""
        await process_one(self.process_many, batch, entry_id)

    async def process_many(
        self, items: Sequence[tuple[PipelineBatch, str]]
    ) -> list[Exception | None]:
        """:meth:`process` for a group of entries: their buffer scripts in one round trip."""
        replies = await run_script_group(
            self.redis, self._buffer, [self._call(batch) for batch, _ in items]
        )
        return await follow_up_each(items, replies, self._write_complete)

    async def _write_complete(self, batch: PipelineBatch, _complete: object) -> None:
        key = self.buffer_key(batch.session_id, batch.generation_id)
        await self._write(batch.session_id, batch.generation_id, key)

    def _call(self, batch: PipelineBatch) -> ScriptCall:
        start = batch.start
        first = batch.first_token
        terminal = batch.terminal
        args = [
            self.buffer_ttl_ms,
            batch.first_seq,
            len(batch.events),
            batch.text,
            batch.token_count,
            batch.model or (start.model if start else ""),
            "" if start is None else start.ts,
            batch.prompt_sha256,
            "1" if start is not None and start.cached else "",
            "" if first is None else first.seq,
            "" if first is None else first.ts,
            "" if terminal is None else terminal.seq,
            "" if terminal is None else terminal.ts,
            _terminal_json(batch),
        ]
        return [self.buffer_key(batch.session_id, batch.generation_id)], args

    async def _write(self, session_id: str, generation_id: str, key: str) -> None:
        raw: Any = await self.redis.hgetall(key)
        if not raw or b"logged" in raw:
            return  # written by a concurrent delivery of the same generation
        record = build_record(
            session_id, generation_id, {as_text(k): as_text(v) for k, v in raw.items()}
        )
        if self.path is not None:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
            await asyncio.to_thread(_append_line, self.path, line.encode())
        else:
            await self._append(
                keys=[self.stream, self.keys.log_once(generation_id)],
                args=[self.once_ttl_ms, self.max_len, *_flat(record)],
            )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.hset(key, "logged", 1)
            pipe.pexpire(key, self.buffer_ttl_ms)
            await pipe.execute()
        self.logged += 1
        log.debug(
            "generation logged session=%s generation=%s outcome=%s tokens=%s",
            session_id,
            generation_id,
            record["outcome"],
            record["tokens"],
        )


def _append_line(path: str, line: bytes) -> None:
    # One write() per record on an O_APPEND descriptor: lines of several processes never mix.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def read_log(redis: Redis, keys: Keys, count: int = 100) -> list[dict[str, str]]:
    """The newest ``count`` records of the Redis log stream, newest first."""
    rows: Any = await redis.xrevrange(keys.log, "+", "-", count=count)
    return [
        {"entry_id": as_text(i), **{as_text(k): as_text(v) for k, v in f.items()}} for i, f in rows
    ]
