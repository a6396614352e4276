"""Redis outages do not end answers (issue 16, item 1): the producer retries a failed write
for up to ``redis_outage_s`` while the model streams on into a bounded buffer; a lost worker's
generation ends right after the last event actually in the stream, exactly once, whoever
notices first; a producer never writes after someone else ended its generation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.pipeline_helpers import demo_job
from tests.servers import RedisServer
from tests.test_consumers import wait_for_length
from tokenbridge.producer.models.demo import DemoModel
from tokenbridge.producer.producer import Producer, _Pending
from tokenbridge.producer.sweeper import LOST_CODE, GenerationSweeper
from tokenbridge.producer.worker import GenerationWorker
from tokenbridge.settings import Settings
from tokenbridge.store.client import REDIS_DOWN_ERRORS
from tokenbridge.store.live import append_events
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.events import Event, decode_entry
from tokenbridge.wire.keys import Keys

AOF_ALWAYS = ["--appendonly", "yes", "--appendfsync", "always"]


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    async with Redis.from_url(settings.redis_url_value() or "") as client:
        yield client


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    with RedisServer(extra_args=AOF_ALWAYS) as server:
        yield server


def _sweeper(redis: Redis, keys: Keys) -> GenerationSweeper:
    return GenerationSweeper(
        redis, keys, deadline_s=60, interval_s=60, retention_s=60, stream_max_len=1000
    )


def _producer(redis: Redis, keys: Keys, **options: Any) -> Producer:
    return Producer(redis, Scripts(redis), keys, 10_000, 60, 60, 4096, 2, **options)


async def _events(redis: Redis, keys: Keys, session_id: str) -> list[Event]:
    return [decode_entry(fields) for _, fields in await redis.xrange(keys.events(session_id))]


def test_the_pending_buffer_is_bounded_in_events_and_bytes() -> None:
    by_events = _Pending(max_events=3, max_bytes=1 << 20)
    for seq in range(3):
        by_events.put_nowait(Event("token", "g", seq, text="x"))
    assert by_events.full()
    by_bytes = _Pending(max_events=1000, max_bytes=1024)
    by_bytes.put_nowait(Event("token", "g", 1, text="y" * 5000))  # one always fits
    assert by_bytes.full()
    with pytest.raises(asyncio.QueueFull):
        by_bytes.put_nowait(Event("token", "g", 2, text="z"))
    by_bytes.get_nowait()
    assert not by_bytes.full() and by_bytes.bytes == 0


def test_tool_call_arguments_count_in_the_pending_bytes() -> None:
    # A tool call's streamed arguments are its text: a fast model's big arguments must make
    # the buffer full (the model waits) as tokens of the same size do.
    pending = _Pending(max_events=1000, max_bytes=1024)
    pending.put_nowait(Event("tool_call", "g", 1, index=0, arguments="a" * 5000))
    assert pending.full()
    pending.get_nowait()
    assert not pending.full() and pending.bytes == 0


async def test_ready_made_events_past_the_pending_bytes_are_all_written(
    settings: Settings, redis: Redis
) -> None:
    # write_events (a cached answer, replayed whole) queues more than producer_max_pending_bytes
    # holds: the model-less writer must wait for room, not fail with QueueFull.
    keys = Keys(settings.key_prefix)
    job = demo_job(7, "s_ready", max_tokens=10, rate=0)
    gid = job.generation_id
    events = [Event("start", gid, 0, model="demo")]
    events += [Event("token", gid, seq, text="t" * 1000) for seq in range(1, 6)]
    events.append(Event("end", gid, 6, reason="stop", tokens=5))
    producer = _producer(redis, keys, max_pending_bytes=1024)
    async with asyncio.timeout(30):
        await producer.write_events(job, *events)
    written = await _events(redis, keys, job.session_id)
    assert [e.seq for e in written] == list(range(7)) and written[-1].kind == "end"


async def test_a_lost_worker_and_a_sweeper_end_a_generation_once_after_the_stream_tail(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    job = demo_job(1, "s_race", max_tokens=5, rate=0)
    sid, gid = job.session_id, job.generation_id
    # seq 2 made it into the stream, the progress record still says 1 (a producer that
    # writes with plain XADDs, cut between them): the end goes after 2, not after 1.
    for event in (
        Event("start", gid, 0, model="demo"),
        Event("token", gid, 1, text="a"),
        Event("token", gid, 2, text="b"),
    ):
        await redis.xadd(keys.events(sid), event.to_fields())  # type: ignore[arg-type]
    await redis.hset(keys.generations(sid), gid, "running 1")
    sweeper = _sweeper(redis, keys)
    worker = GenerationWorker(
        redis, None, keys, _producer(redis, keys), {}, concurrency=1, block_ms=100,  # type: ignore[arg-type]
        claim_idle_ms=1000, heartbeat_s=1,
    )  # fmt: skip
    await sweeper.register([(sid, gid)], due_now=True)
    results = await asyncio.gather(
        worker._recovered(job), sweeper.sweep(), worker._recovered(job), sweeper.sweep()
    )
    assert results[0] and results[2]  # nothing left to run
    events = await _events(redis, keys, sid)
    terminal = [e for e in events if e.kind in ("end", "error")]
    assert len(terminal) == 1, terminal
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert terminal[0].code in ("worker_lost", LOST_CODE)
    assert await redis.hget(keys.generations(sid), gid) == b"done 3 lost"


async def test_a_producer_stops_when_another_ended_its_generation(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    job = demo_job(2, "s_ended", max_tokens=100_000, rate=200)
    producer = _producer(redis, keys)
    run = asyncio.create_task(producer.run(job, DemoModel()))
    async with asyncio.timeout(30):
        await wait_for_length(redis, keys.events(job.session_id), 10)
        # Its job was taken over: the new owner ended the generation (worker_lost).
        seq = await _sweeper(redis, keys).end_lost(
            job.session_id, job.generation_id, code="worker_lost", message="lost"
        )
        result = await run
    assert result.outcome == "lost"
    events = await _events(redis, keys, job.session_id)
    assert events[-1].kind == "error" and events[-1].seq == seq  # nothing after it
    assert [e.seq for e in events] == list(range(len(events)))


async def test_a_retried_last_batch_is_told_ended_when_a_sweeper_ended_at_its_seq(
    settings: Settings, redis: Redis
) -> None:
    """The sweeper's lost end took the seq the producer's last batch was to end at: the
    producer's retry of that batch (its first reply lost) is refused as ``ended``, never
    taken for ``applied`` (the stream holds the sweeper's error, not the producer's end)."""
    keys = Keys(settings.key_prefix)
    sid, gid = "s_lost_seq", "g_lost_seq"
    four = (keys.events(sid), keys.meta(sid), keys.generations(sid), keys.live(sid))
    start = Event("start", gid, 0, model="demo").to_fields()
    first = await append_events(redis, four, gid, [start], state="running 0", new_epoch="e1")
    assert first.last_id not in ("applied", "ended")
    assert await _sweeper(redis, keys).end_lost(sid, gid) == 1  # the lost end takes seq 1
    end = Event("end", gid, 1, reason="stop").to_fields()
    retry = await append_events(
        redis, four, gid, [end], state="done 1", expected_state="running 0", new_epoch="e2"
    )
    assert retry.ended, retry
    events = await _events(redis, keys, sid)
    assert [(e.kind, e.seq) for e in events] == [("start", 0), ("error", 1)]


async def test_a_job_delivered_twice_is_written_by_one_producer_only(
    settings: Settings, redis: Redis
) -> None:
    """A job submitted twice (its submission retried after a lost reply) reaches two
    producers: the second one's first batch is refused, during and after the first's run."""
    keys = Keys(settings.key_prefix)
    job = demo_job(3, "s_twice", max_tokens=40, rate=200)
    first = asyncio.create_task(_producer(redis, keys).run(job, DemoModel()))
    async with asyncio.timeout(30):
        await wait_for_length(redis, keys.events(job.session_id), 5)
        during = await _producer(redis, keys).run(job, DemoModel())
        done = await first
        after = await _producer(redis, keys).run(job, DemoModel())
    assert (during.outcome, done.outcome, after.outcome) == ("lost", "length", "lost")
    events = await _events(redis, keys, job.session_id)
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.kind for e in events].count("start") == 1 and events[-1].kind == "end"


async def test_writers_without_a_token_or_a_failover_check_are_never_refused(
    settings: Settings, redis: Redis
) -> None:
    """A writer that sends no token and no expected state (the benchmark's producer, older
    producers) appends every batch: only a token of another writer refuses a first batch."""
    keys = Keys(settings.key_prefix)
    sid, gid = "s_plain", "g_plain"
    four = (keys.events(sid), keys.meta(sid), keys.generations(sid), keys.live(sid))
    for seq in range(3):
        event = Event("token", gid, seq, text="x").to_fields()
        result = await append_events(
            redis, four, gid, [event], state=f"running {seq}", new_epoch="e1"
        )
        assert not result.ended and result.last_id != "applied", result
    assert await redis.xlen(keys.events(sid)) == 3


async def test_an_answer_goes_on_through_a_redis_restart(
    aof_redis: RedisServer, settings_factory: Any
) -> None:
    settings = settings_factory(redis_url=aof_redis.url)
    keys = Keys(settings.key_prefix)
    job = demo_job(3, "s_outage", max_tokens=600, rate=300)
    model, yielded = _CountingModel(), []
    async with Redis.from_url(aof_redis.url) as redis:
        producer = _producer(redis, keys, outage_s=20)
        run = asyncio.create_task(producer.run(job, model))
        async with asyncio.timeout(60):
            await wait_for_length(redis, keys.events(job.session_id), 20)
            aof_redis.kill()
            yielded.append(model.count)
            await asyncio.sleep(0.5)  # the outage's length, not a sync
            yielded.append(model.count)
            aof_redis.start()
            result = await run
        events = await _events(redis, keys, job.session_id)
    assert yielded[1] > yielded[0]  # the model streamed on while Redis was away
    assert result.outcome == "length" and result.tokens == 600
    assert [e.seq for e in events] == list(range(602))  # every event once, in order
    assert events[-1].kind == "end"


async def test_past_redis_outage_s_the_producer_gives_up(
    aof_redis: RedisServer, settings_factory: Any
) -> None:
    redis_server = aof_redis  # a server of its own: this test kills it
    settings = settings_factory(redis_url=redis_server.url)
    keys = Keys(settings.key_prefix)
    job = demo_job(4, "s_gone", max_tokens=100_000, rate=200)
    async with Redis.from_url(redis_server.url) as redis:
        run = asyncio.create_task(_producer(redis, keys, outage_s=0.5).run(job, DemoModel()))
        async with asyncio.timeout(30):
            await wait_for_length(redis, keys.events(job.session_id), 5)
            redis_server.kill()
            with pytest.raises(BaseExceptionGroup) as failure:
                await run
    assert failure.value.subgroup(REDIS_DOWN_ERRORS) is not None


class _CountingModel(DemoModel):
    """The demo model, counting what it yielded."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def stream(self, request: Any) -> Any:
        async with contextlib.aclosing(super().stream(request)) as items:
            async for item in items:
                self.count += 1
                yield item


async def _append(redis: Redis, keys: Keys, sid: str, trim: str, n: int) -> int:
    """``n`` token events in batches of 100 through the append script; the stream's length."""
    gen, state = "g_trim", ""
    k = (keys.events(sid), keys.meta(sid), keys.generations(sid), keys.live(sid))
    for first in range(1, n + 1, 100):
        events = [
            {"v": "1", "kind": "token", "gen": gen, "seq": str(seq), "ts": "1", "text": "t"}
            for seq in range(first, first + 100)
        ]
        new = f"running {first + 99}"
        await append_events(
            redis, k, gen, events, state=new, expected_state=state, new_epoch="e1", maxlen=trim
        )
        state = new
    length: int = await redis.xlen(keys.events(sid))
    return length


async def test_recent_history_is_kept_past_stream_max_len_within_the_hard_cap(
    settings: Settings, redis: Redis
) -> None:
    keys = Keys(settings.key_prefix)
    # By count only (stream_history_s = 0): about stream_max_len entries stay.
    assert await _append(redis, keys, "s_count", "100", 3000) < 400
    # By age: everything of the last minute stays, however fast the session is ...
    assert await _append(redis, keys, "s_young", "100 60 100000", 3000) == 3000
    # ... up to the hard cap.
    assert await _append(redis, keys, "s_capped", "100 60 1000", 3000) < 1300
    # Past stream_max_len, entries older than stream_history_s go, never below the count.
    for n in range(1, 201):  # two whole stream nodes from 1970 (trimming is by node: ~)
        await redis.xadd(keys.events("s_old"), {"kind": "token"}, id=f"1-{n}")
    assert await _append(redis, keys, "s_old", "100 60 100000", 3000) == 3000
    first: Any = await redis.xrange(keys.events("s_old"), count=1)
    assert not first[0][0].startswith(b"1-")


async def test_stream_max_len_stays_a_floor_when_the_hard_cap_is_set_below_it(
    settings: Settings, redis: Redis
) -> None:
    # stream_max_len is kept "whatever their age": a stream_history_max_len below it (its
    # default, 200,000, under a stream_max_len raised past it) must not trim below it.
    keys = Keys(settings.key_prefix)
    job = demo_job(5, "s_floor", max_tokens=1000, rate=0)
    producer = Producer(
        redis, Scripts(redis), keys, 300, 60, 60, 4096, 2, history_s=60, history_max_len=100
    )
    assert (await producer.run(job, DemoModel())).outcome == "length"
    assert await redis.xlen(keys.events(job.session_id)) >= 300
    # history_s alone (no hard cap given): the count still bounds the stream.
    job = demo_job(6, "s_no_cap", max_tokens=1000, rate=0)
    producer = Producer(redis, Scripts(redis), keys, 300, 60, 60, 4096, 2, history_s=60)
    assert (await producer.run(job, DemoModel())).outcome == "length"
    assert await redis.xlen(keys.events(job.session_id)) >= 300
