"""Producer: runs one generation and appends its events to the session stream.

The model's tokens go into a bounded queue; one writer task drains whatever is queued and
writes it in one round trip (``XADD ... MAXLEN ~`` per event, one pipeline entry carrying the
whole batch for the processors (``wire/pipeline.py``), the generation's progress record, and a
read of its cancel flag), hand-packed (``store/resp.py``). While a round trip is in flight
the next tokens queue up, so the batch size follows the speed of the model relative to Redis:
one event per write for a slow model, thousands for a fast one. The queue is bounded in events
and bytes (``producer_max_pending``, ``producer_max_pending_bytes``): full, it makes the model
wait (backpressure) instead of growing memory.

A write that fails (Redis restarting or failing over, a reply lost with its connection) is
sent again with backoff for up to ``redis_outage_s``, the model streaming on into the queue
meanwhile; clients get the rest once Redis is back. Both commands of a round trip are scripts
that recognise a batch they already wrote (``store/pipeline_add.py``, ``store/live.py``), so
a retry never doubles a ``seq`` or a pipeline entry. Past ``redis_outage_s`` the write's error
propagates; the worker hands the generation to the sweeper, which ends it with ``error
generation_lost`` once Redis is back (``producer/sweeper.py``): an end, never a silent loss.
If another process ended the generation meanwhile (its job taken over: ``worker_lost``), the
append script refuses the batch and the producer stops without writing anything more.

Every generation ends with exactly one terminal event: ``end`` (stop, length, tool_calls,
content_filter, cancelled, abandoned) or
``error`` (with a code). Then the session's keys get their retention TTL. A cancel request
(``producer/cancel.py``) is seen through the flag read with every write, or at once through
the ``cancel`` event the worker sets on a pub/sub notice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from tokenbridge.exceptions import ModelError
from tokenbridge.producer.cancel import CancelSignal
from tokenbridge.producer.jobs import GenerationJob
from tokenbridge.producer.models.base import ChatModel, Delta, Finish, ToolCallDelta
from tokenbridge.store.client import Backoff
from tokenbridge.store.live import APPEND_RETRY_ERRORS, AppendCommand, AppendResult, send_append
from tokenbridge.store.pipeline_add import PipelineAdd
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.events import SCHEMA, WIRE_VERSION, Event, now_ms
from tokenbridge.wire.keys import Keys
from tokenbridge.wire.pipeline import PipelineHeader, events_json, prompt_digest

__all__ = ["GenerationResult", "Producer"]

log = logging.getLogger(__name__)

_MAX_BATCH = 4096
_EVENT_BYTES = 64  # a queued event's size beyond its text, for producer_max_pending_bytes
_PIPELINE_EVENTS = 256  # pipeline entry: at most this many events ...
_PIPELINE_S = 0.5  # ... or this old (the terminal event flushes at once)
# The fields a token entry packs per token, after v, kind and gen (wire/events.py SCHEMA).
TOKEN_VALUES = (b"seq", b"ts", *(spec.name.encode() for spec in SCHEMA["token"]))


@dataclass(slots=True)
class GenerationResult:
    """How a generation ended, with its figures."""

    generation_id: str
    outcome: str  # stop | length | tool_calls | content_filter | cancelled | abandoned | error:<c>
    tokens: int
    writes: int
    first_token_s: float | None
    duration_s: float


class _Pending(asyncio.Queue[Event]):
    """Events not yet written, bounded in events and in bytes (text and tool-call arguments
    + ``_EVENT_BYTES`` each): full, ``put`` waits (the model waits). One event always fits in
    an empty queue. (The ``_init``/``_put``/``_get`` hooks are asyncio's for subclasses, as
    ``PriorityQueue``.)"""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        super().__init__(maxsize=max_events)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.bytes = 0

    def _init(self, maxsize: int) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._queue = self._items  # what asyncio's own methods look at

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        n = len(self._items)
        return n >= self.max_events or (n > 0 and self.bytes >= self.max_bytes)

    def _put(self, item: Event) -> None:
        self._items.append(item)
        self.bytes += len(item.text) + len(item.arguments) + _EVENT_BYTES

    def _get(self) -> Event:
        item = self._items.popleft()
        self.bytes -= len(item.text) + len(item.arguments) + _EVENT_BYTES
        return item


class _Writer:
    """Batches a generation's events into single round trips; watches the cancel flag."""

    def __init__(self, producer: Producer, job: GenerationJob, cancel: asyncio.Event) -> None:
        p = producer
        self.producer = producer
        self.job = job
        self.cancel = cancel
        self.queue: asyncio.Queue[Event] = _Pending(p.max_pending, p.max_pending_bytes)
        self.writes = 0
        self.ended = False  # another process ended the generation: write nothing more
        sid = job.session_id
        self.gen = job.generation_id.encode()
        self.state = b""  # what the previous batch wrote to :gens (the failover check)
        # Each state carries this writer's token: a retry of its own batch matches its record
        # exactly ("applied"), a second writer of the same generation (a job delivered twice)
        # never does, and its first batch is refused ("ended": store/append.lua).
        self.token = secrets.token_hex(4).encode()
        # One script call per batch appends and publishes (store/live.py). Every token entry
        # shares its leading fields: only seq, ts and text are packed per token (the token's
        # fields, as wire/events.py declares them).
        self.append = AppendCommand(
            tuple(k.encode() for k in (p.keys.events(sid), p.keys.meta(sid),  # type: ignore[arg-type]
                                       p.keys.generations(sid), p.keys.live(sid))),
            self.gen,
            p.trim,
            [(b"v", WIRE_VERSION.encode()), (b"kind", b"token"), (b"gen", self.gen)],
            TOKEN_VALUES,
        )  # fmt: skip
        self.pipeline_key = b""
        # One pipeline entry per batch, for the processors (wire/pipeline.py), added once.
        self.pipeline: tuple[PipelineAdd, list[tuple[bytes, bytes]], bytes] | None = None
        self.pipeline_pending: list[Event] = []
        self.pipeline_since = 0.0
        if p.pipeline_shards:
            digest = prompt_digest([m.to_dict() for m in job.messages])
            header = PipelineHeader.of(
                p.keys, job.session_id, job.generation_id, job.model, digest, p.pipeline_shards
            )
            key, fields = header.key.encode(), header.fields()
            self.pipeline_key = key
            marker = p.keys.pipeline_written(header.key, job.generation_id).encode()
            add = PipelineAdd(key, marker, p.pipeline_max_len)
            self.pipeline = (add, fields, digest.encode())

    def _event(self, event: Event) -> tuple[bytes, int]:
        if event.kind == "token":
            return self.append.token(b"%d" % event.seq, b"%d" % event.ts, event.text.encode())
        return AppendCommand.event([(k.encode(), v.encode()) for k, v in event.to_fields().items()])

    def _pipeline_entry(self, batch: list[Event], terminal: bool) -> bytes | None:
        """The pipeline entry to write with this round trip, if one is due.

        Events are gathered across round trips and sent as one entry per ``_PIPELINE_EVENTS``
        events or ``_PIPELINE_S`` seconds (and with the terminal event): a slow model flushes one
        token per round trip, and one pipeline entry per token would cost the processors
        ~50x more than the gateway spends delivering it.
        """
        if self.pipeline is None:
            return None
        if not self.pipeline_pending:
            self.pipeline_since = time.monotonic()
        self.pipeline_pending.extend(batch)
        due = (
            terminal
            or len(self.pipeline_pending) >= _PIPELINE_EVENTS
            or time.monotonic() - self.pipeline_since >= _PIPELINE_S
        )
        if not due:
            return None
        events, self.pipeline_pending = self.pipeline_pending, []
        add, fields, digest = self.pipeline
        if any(e.kind == "start" for e in events):
            fields = [*fields, (b"prompt_sha256", digest)]
        fields = [*fields, (b"events", events_json(events))]
        p = self.producer
        # The marker must outlive every retry of this batch; the last one's, no longer.
        ttl = min(math.ceil(p.outage_s) + 1, p.max_generation_s) if terminal else p.max_generation_s
        return add.pack(events[0].seq, events[-1].seq, ttl, fields)

    async def _send(self, before: list[tuple[bytes, bytes]], command: bytes) -> AppendResult:
        """Send the batch; through a failover (a primary dies, its replica takes over), a
        restart or a lost reply, again with backoff for up to ``redis_outage_s``: what made it
        before the reply was lost is recognised by its script and not written twice."""
        deadline = time.monotonic() + self.producer.outage_s
        backoff = Backoff(base_s=0.1, cap_s=1.0)
        while True:
            try:
                return (await send_append(self.producer.redis, before, self.append, command))[1]
            except APPEND_RETRY_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise
                delay = backoff.next()
                log.warning(
                    "append failed generation=%s (%s); again in %.2fs",
                    self.job.generation_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def run(self) -> None:
        """Write until a terminal event is written."""
        p = self.producer
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < _MAX_BATCH:
                batch.append(self.queue.get_nowait())
            last = batch[-1]
            terminal = last.kind in ("end", "error")
            if self.ended:  # drop what the model still sends until its terminal event
                if terminal:
                    return
                continue
            state = b"%b %d %b" % (b"done" if terminal else b"running", last.seq, self.token)
            events = [self._event(event) for event in batch]
            pipeline_xadd = self._pipeline_entry(batch, terminal)
            # The pipeline entry first: a `running <seq>` record implies its entries exist.
            before = [] if pipeline_xadd is None else [(self.pipeline_key, pipeline_xadd)]
            # The first write creates the keys: bound their life at once (a crashed worker
            # must not leave them forever); the last one starts the retention.
            ttl = p.retention_s if terminal else p.max_generation_s if not self.writes else None
            command = self.append.pack(
                events, state, self.state, ttl, secrets.token_hex(4).encode(), p.max_generation_s
            )
            result = await self._send(before, command)
            if result.ended:
                log.warning(
                    "generation ended by another process (its job was taken over); stopping "
                    "session=%s generation=%s", self.job.session_id, self.job.generation_id,
                )  # fmt: skip
                self.ended = True
                if terminal:
                    return
                if isinstance(self.cancel, CancelSignal):
                    self.cancel.cancel("lost")
                else:
                    self.cancel.set()
                continue
            self.state = state
            self.writes += 1
            published = self.producer.on_published
            if published is not None and result.readers >= 0:
                published(self.job.generation_id, result.readers)
            if result.lost:
                log.warning(
                    "earlier writes lost (failover?): new epoch session=%s generation=%s",
                    self.job.session_id,
                    self.job.generation_id,
                )
            if terminal:
                return
            if result.cancel and not self.cancel.is_set():
                log.info("generation cancel seen generation=%s", self.job.generation_id)
                self.cancel.set()


class Producer:
    """Runs generations: model tokens in, batched session-stream writes out."""

    def __init__(
        self,
        redis: Redis,
        scripts: Scripts,
        keys: Keys,
        stream_max_len: int,
        retention_s: int,
        max_generation_s: int,
        max_pending: int,
        pipeline_shards: int = 0,
        pipeline_max_len: int = 100_000,
        *,
        outage_s: float = 30.0,
        max_pending_bytes: int = 4 * 1024 * 1024,
        history_s: int = 0,
        history_max_len: int = 0,
    ) -> None:
        self.redis = redis
        self.outage_s = outage_s  # how long a failed write is retried
        self.max_pending_bytes = max_pending_bytes
        # The append script's trim (store/live.py): by count, or by age within a hard cap.
        # The count is a floor "whatever their age": a hard cap below it (or none) is raised.
        self.hard_max_len = stream_max_len
        if history_s > 0:
            self.hard_max_len = max(history_max_len, stream_max_len)
        self.trim: int | bytes = stream_max_len
        if history_s > 0:
            self.trim = b"%d %d %d" % (stream_max_len, history_s, self.hard_max_len)
        self.pipeline_shards = pipeline_shards  # 0: no pipeline entries
        self.pipeline_max_len = pipeline_max_len
        self.scripts = scripts
        self.keys = keys
        self.stream_max_len = stream_max_len
        self.retention_s = retention_s
        self.max_generation_s = max_generation_s
        self.max_pending = max_pending
        # Told, per published batch, how many gateways it reached: (generation id, readers).
        self.on_published: Callable[[str, int], None] | None = None

    async def prepare(self, session_id: str) -> None:
        """Make sure the session has an epoch, and bound its keys' life while generating."""
        ttl_ms = self.max_generation_s * 1000
        await self.scripts.session_state(
            self.keys.meta(session_id),
            self.keys.events(session_id),
            new_epoch=secrets.token_hex(4),
            orphan_ttl_ms=ttl_ms,
            extend_ttl_ms=ttl_ms,
        )
        await self.redis.expire(self.keys.generations(session_id), self.max_generation_s)

    async def write_events(self, job: GenerationJob, *events: Event) -> None:
        """Write ready-made events ending in a terminal one (a job that cannot run, a lost
        worker, an answer replayed from the cache), batched like a live generation."""
        await self.prepare(job.session_id)
        writer = _Writer(self, job, asyncio.Event())
        async with asyncio.TaskGroup() as group:
            group.create_task(writer.run())
            for event in events:  # waits for room: more than the queue's bounds may come
                await writer.queue.put(event)

    async def run(
        self, job: GenerationJob, model: ChatModel, cancel: asyncio.Event | None = None
    ) -> GenerationResult:
        """Run ``job`` on ``model`` to its terminal event.

        A model error becomes an ``error`` event. Setting ``cancel`` (or the job's cancel flag
        in Redis) stops the model call and writes ``end`` with reason ``cancelled`` (or the
        reason of a :class:`CancelSignal`, such as ``abandoned``); so does
        cancelling this coroutine, which then re-raises. Redis errors propagate.
        """
        await self.prepare(job.session_id)
        cancel = cancel or CancelSignal()
        writer = _Writer(self, job, cancel)
        # The keys' safety TTL is max_generation_s: the generation must end before it.
        reader = _ModelReader(job, model, writer, max(1.0, self.max_generation_s - 5))
        async with asyncio.TaskGroup() as group:
            write_task = group.create_task(writer.run())
            read_task = group.create_task(reader.run())
            watch = group.create_task(_cancel_on(cancel, read_task, reader))
            try:
                await asyncio.shield(read_task)
            except asyncio.CancelledError:
                read_task.cancel()  # our own cancellation: end the stream, then re-raise
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    async with asyncio.timeout(10):  # bounded: the writer drains the queue
                        await asyncio.wait({read_task})
                        await asyncio.shield(write_task)
                raise
            finally:
                watch.cancel()
        return GenerationResult(
            job.generation_id,
            reader.outcome,
            reader.tokens,
            writer.writes,
            reader.first_token_s,
            time.monotonic() - reader.started,
        )


async def _cancel_on(cancel: asyncio.Event, task: asyncio.Task[None], reader: _ModelReader) -> None:
    await cancel.wait()
    if not reader.finishing:  # a terminal event waiting for room in the queue must go out
        task.cancel()


class _ModelReader:
    """Reads the model and queues its events; exactly one terminal event, whatever happens."""

    def __init__(self, job: GenerationJob, model: ChatModel, writer: _Writer, max_s: float) -> None:
        self.max_s = max_s
        self.job = job
        self.model = model
        self.writer = writer
        self.outcome = "error"
        self.tokens = 0
        self.seq = 0
        self.started = time.monotonic()
        self.first_token_s: float | None = None
        self.finishing = False  # the terminal event is decided: a cancel no longer applies

    async def run(self) -> None:
        job, put = self.job, self.writer.queue.put
        gid = job.generation_id
        try:
            await put(Event("start", gid, 0, model=job.model))
            async with asyncio.timeout(self.max_s):
                terminal = await self._tokens()
        except ModelError as exc:
            self.outcome = f"error:{exc.code}"
            log.info("generation failed generation=%s code=%s", gid, exc.code)
            terminal = Event("error", gid, self.seq + 1, code=exc.code, message=str(exc)[:1000])
        except TimeoutError:
            self.outcome = "error:max_duration"
            message = f"stopped after {self.max_s}s (TOKENBRIDGE_STREAM_MAX_GENERATION_S)"
            terminal = Event("error", gid, self.seq + 1, code="max_duration", message=message)
        except asyncio.CancelledError:
            cancel = self.writer.cancel
            self.outcome = cancel.reason if isinstance(cancel, CancelSignal) else "cancelled"
            terminal = Event("end", gid, self.seq + 1, reason=self.outcome, tokens=self.tokens)
        self.finishing = True
        await put(terminal)

    async def _tokens(self) -> Event:
        gid = self.job.generation_id
        queue = self.writer.queue
        stream = self.model.stream(self.job.chat_request())
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                if isinstance(item, Delta | ToolCallDelta):
                    if self.first_token_s is None:
                        self.first_token_s = time.monotonic() - self.started
                    if isinstance(item, Delta):
                        event = Event("token", gid, self.seq + 1, now_ms(), item.text)
                    else:  # shares seq with the tokens; `tokens` counts text tokens only
                        event = Event(
                            "tool_call", gid, self.seq + 1, index=item.index,
                            call_id=item.call_id, name=item.name, arguments=item.arguments,
                        )  # fmt: skip
                    try:
                        queue.put_nowait(event)
                    except asyncio.QueueFull:
                        await queue.put(event)
                    # Counted once queued: a cancel while waiting leaves no hole in seq.
                    self.seq += 1
                    self.tokens += event.kind == "token"
                elif isinstance(item, Finish):
                    self.outcome = item.reason
                    return Event(
                        "end", gid, self.seq + 1, reason=item.reason, tokens=self.tokens,
                        usage=item.usage,
                    )  # fmt: skip
        self.outcome = "stop"
        return Event("end", gid, self.seq + 1, reason="stop", tokens=self.tokens)
