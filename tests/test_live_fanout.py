"""The pub/sub fan-out (gateway/fanout.py) on standalone Redis and on a real cluster.

Producers append with the one-call script (store/live.py); connections open, get their
history and live entries exactly once, in order, whatever they missed and however the
subscriber lost its connection.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError

from tokenbridge.gateway.client_connection import ClientConnection
from tokenbridge.gateway.fanout import SessionFanout, _after_delivered, _Feed
from tokenbridge.gateway.frames import Frame, parse_entry_id
from tokenbridge.gateway.opening import from_memory
from tokenbridge.gateway.resume import iter_history
from tokenbridge.store.client import command_client, is_cluster
from tokenbridge.store.live import AppendCommand, append_events, send_append
from tokenbridge.store.scripts import Scripts
from tokenbridge.wire.events import Event
from tokenbridge.wire.keys import Keys


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = command_client(redis_url, 16, 10)
    yield client
    await client.aclose()
    if not is_cluster(client):
        await client.connection_pool.disconnect()


@pytest.fixture
def keys() -> Keys:
    return Keys("t" + secrets.token_hex(4))


@pytest.fixture
async def fanout(redis: Any, keys: Keys) -> AsyncIterator[SessionFanout]:
    fan = SessionFanout(redis, Scripts(redis), keys, history_batch=5, probe_s=1.0)
    task = asyncio.create_task(fan.run())
    yield fan
    fan.stop()
    async with asyncio.timeout(10):
        await task


class Writer:
    """One generation of one session, appended like the producer does."""

    def __init__(self, redis: Any, keys: Keys, session_id: str) -> None:
        self.redis, self.keys, self.sid = redis, keys, session_id
        self.gen = "g_" + secrets.token_hex(4)
        self.seq = 0
        self.state = ""
        self.readers = -1  # what the last append's SPUBLISH reached

    async def tokens(self, n: int) -> None:
        events = []
        for _ in range(n):
            self.seq += 1
            events.append({"v": "1", "kind": "token", "gen": self.gen, "seq": str(self.seq),
                           "ts": "1", "text": f"t{self.seq}"})  # fmt: skip
        k = self.keys
        state = f"running {self.seq}"
        result = await append_events(
            self.redis,
            (k.events(self.sid), k.meta(self.sid), k.generations(self.sid), k.live(self.sid)),
            self.gen,
            events,
            state=state,
            expected_state=self.state,
            new_epoch=secrets.token_hex(4),
        )
        self.state = state
        self.readers = result.readers


async def texts(fanout: SessionFanout, conn: ClientConnection, last: Any, n: int) -> list[str]:
    """What a pump would write: history, then live, cut after what was sent; ``n`` events."""
    sent: list[str] = []
    opening = await fanout.open(conn, last)
    batches = list(opening.history)
    if opening.more_after is not None:
        history = iter_history(
            fanout.redis, fanout.keys.events(conn.session_id), conn.session_id,
            opening.epoch, opening.more_after, 5,
        )  # fmt: skip
        batches += [batch async for batch in history]
    async with asyncio.timeout(10):
        while True:
            for batch in batches:
                unsent = conn.unsent(batch)
                if unsent.frames:
                    conn.mark_sent(unsent, 0)
                    sent += [frame.event.text for frame in unsent.frames]
            if len(sent) >= n:
                break
            got = await conn.next_batches(5)
            assert got is not None, conn.closed_reason
            batches = got
    return sent


async def until(condition: Any, timeout_s: float = 10) -> None:
    """Wait for a state of this process that no event announces (bounded, 100 checks/s)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def expected(first: int, last: int) -> list[str]:
    return [f"t{i}" for i in range(first, last + 1)]


async def test_live_and_history_exactly_once(redis: Any, keys: Keys, fanout: SessionFanout) -> None:
    writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
    await writer.tokens(7)  # more than one history page
    conn = ClientConnection(writer.sid, "sse", 1000)

    async def write_more() -> None:
        for _ in range(5):
            await writer.tokens(3)

    results = await asyncio.gather(texts(fanout, conn, None, 22), write_more())
    assert results[0] == expected(1, 22)


async def test_resume_from_memory_costs_no_read(
    redis: Any, keys: Keys, fanout: SessionFanout
) -> None:
    writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
    await writer.tokens(2)
    first = ClientConnection(writer.sid, "sse", 1000)
    assert await texts(fanout, first, None, 2) == expected(1, 2)
    fanout.unsubscribe(first)
    await writer.tokens(4)  # the client is away; its feed lingers and hears these
    await until(lambda: fanout.stats.read >= 4)
    back = ClientConnection(writer.sid, "sse", 1000)
    before = fanout.stats.memory_resumes
    last = (fanout._feeds[writer.sid].epoch, _entry_id_of(first))
    assert await texts(fanout, back, last, 4) == expected(3, 6)
    assert fanout.stats.memory_resumes == before + 1


async def test_resume_soon_after_a_live_message_reads_no_epoch(redis: Any, keys: Keys) -> None:
    """Within ``epoch_trust_s`` of a live message, a resume from memory asks Redis nothing:
    an epoch changed behind the feed's back (no message) goes unseen. Past it, the one HGET
    sees the change, and the client gets a gap."""
    fan = SessionFanout(redis, Scripts(redis), keys, history_batch=5, epoch_trust_s=3600)
    task = asyncio.create_task(fan.run())
    try:
        writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
        await writer.tokens(2)
        first = ClientConnection(writer.sid, "sse", 1000)
        assert await texts(fan, first, None, 2) == expected(1, 2)
        fan.unsubscribe(first)
        await writer.tokens(4)  # heard live while the client is away
        await until(lambda: fan.stats.read >= 4)
        await redis.hset(keys.meta(writer.sid), "epoch", "behind1")  # only a read would see it
        last = (fan._feeds[writer.sid].epoch, _entry_id_of(first))
        back = ClientConnection(writer.sid, "sse", 1000)
        assert await texts(fan, back, last, 4) == expected(3, 6)
        assert (fan.stats.memory_resumes, fan.stats.redis_resumes) == (1, 1)
        fan.unsubscribe(back)

        fan.epoch_trust_s = 0.0  # the message is too old now: the epoch is read
        late = ClientConnection(writer.sid, "sse", 1000)
        opening = await fan.open(late, last)
        assert opening.gap is not None and opening.epoch == "behind1"
        assert (fan.stats.memory_resumes, fan.stats.redis_resumes) == (1, 2)
    finally:
        fan.stop()
        async with asyncio.timeout(10):
            await task


async def test_connections_opening_together_share_their_reads(
    redis: Any, keys: Keys, fanout: SessionFanout
) -> None:
    """A storm of new connections: their history reads go out in shared pipelines, each
    connection gets its own session's history, and one session's error stays its own."""
    writers = [Writer(redis, keys, "s_" + secrets.token_hex(6)) for _ in range(20)]
    for writer in writers:
        await writer.tokens(3)
    broken = "s_" + secrets.token_hex(6)
    await redis.set(keys.events(broken), "not a stream")  # XRANGE fails with WRONGTYPE
    conns = [ClientConnection(w.sid, "sse", 1000) for w in writers]
    results = await asyncio.gather(
        *(texts(fanout, conn, None, 3) for conn in conns),
        fanout.open(ClientConnection(broken, "sse", 1000), None),
        return_exceptions=True,
    )
    assert results[:-1] == [expected(1, 3)] * 20
    assert isinstance(results[-1], ResponseError) and "WRONGTYPE" in str(results[-1])
    assert fanout.reads.reads == 21 and fanout.reads.pipelines < 21


def _entry_id_of(conn: ClientConnection) -> str:
    ms, seq = conn.last_key
    return f"{ms}-{seq}"


async def test_repair_after_the_subscriber_lost_its_connection(
    redis: Any, keys: Keys, fanout: SessionFanout
) -> None:
    writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
    conn = ClientConnection(writer.sid, "sse", 1000)
    await writer.tokens(4)
    got = asyncio.create_task(texts(fanout, conn, None, 12))
    await until(lambda: conn.events_sent >= 4)  # history sent, the feed knows its place
    # Cut every pub/sub connection; write meanwhile: the feed must repair from the stream.
    nodes = redis.get_primaries() if is_cluster(redis) else [None]
    for node in nodes:
        target = {"target_nodes": node} if node is not None else {}
        await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub", **target)
    for _ in range(4):
        await writer.tokens(2)
    async with asyncio.timeout(15):
        assert await got == expected(1, 12)


async def test_an_empty_message_means_read_the_stream(
    redis: Any, keys: Keys, fanout: SessionFanout
) -> None:
    sid = "s_" + secrets.token_hex(6)
    writer = Writer(redis, keys, sid)
    await writer.tokens(1)
    conn = ClientConnection(sid, "sse", 1000)
    got = asyncio.create_task(texts(fanout, conn, None, 3))
    await until(lambda: conn.events_sent >= 1)
    # A plain-XADD producer: XADD, then SPUBLISH an empty message.
    for seq in (2, 3):
        fields = {"v": "1", "kind": "token", "gen": writer.gen, "seq": str(seq), "ts": "1",
                  "text": f"t{seq}"}  # fmt: skip
        await redis.xadd(keys.events(sid), fields)
    await redis.execute_command("SPUBLISH", keys.live(sid), "")
    async with asyncio.timeout(10):
        assert await got == expected(1, 3)


async def test_packed_append_with_pipeline_entry_and_no_script_loaded(
    redis: Any, keys: Keys, fanout: SessionFanout
) -> None:
    """The producer's path: the pipeline entry (another slot) and the append in one go; a
    node that lost its scripts (restart, promoted replica) gets the script again."""
    sid = "s_" + secrets.token_hex(6)
    k = keys
    names = tuple(name.encode() for name in (k.events(sid), k.meta(sid), k.generations(sid)))
    command = AppendCommand(
        (*names, k.live(sid).encode()), b"g_1", 1000,
        [(b"v", b"1"), (b"kind", b"token"), (b"gen", b"g_1")], (b"seq", b"ts", b"text"),
    )  # fmt: skip
    conn = ClientConnection(sid, "sse", 1000)
    got = asyncio.create_task(texts(fanout, conn, None, 5))
    await until(lambda: fanout._feeds.get(sid) is not None and fanout._feeds[sid].cursor)
    await redis.script_flush()  # every primary on a cluster
    state = b""
    for first in (1, 4):
        events = [command.token(b"%d" % i, b"1", b"t%d" % i) for i in range(first, first + 3)]
        if first == 4:
            events = events[:2]
        new_state = b"running %d" % (first + len(events) - 1)
        packed = command.pack(events, new_state, state, None, b"e0000001", 60)
        pipeline_key = f"{k.prefix}:pipeline:0".encode()
        xadd = pack_xadd_for_test(pipeline_key)
        before, result = await send_append(redis, [(pipeline_key, xadd)], command, packed)
        assert not result.lost and not result.cancel and len(before) == 1
        state = new_state
    assert await got == expected(1, 5)
    assert await redis.xlen(f"{k.prefix}:pipeline:0") == 2


def pack_xadd_for_test(key: bytes) -> bytes:
    from tokenbridge.store.resp import pack

    return pack(b"XADD", key, b"*", b"events", b"[]")


async def test_a_lost_write_gives_the_session_a_new_epoch(redis: Any, keys: Keys) -> None:
    """The producer's previous batch is gone (as after an asynchronous failover): the script
    changes the epoch, so resuming clients get a ``gap`` instead of a silent hole."""
    writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
    await writer.tokens(3)
    epoch = await redis.hget(keys.meta(writer.sid), "epoch")
    await redis.hset(keys.generations(writer.sid), writer.gen, "running 1")  # lost 2..3
    await writer.tokens(1)
    assert await redis.hget(keys.meta(writer.sid), "epoch") != epoch


async def test_a_message_after_a_gap_makes_the_feed_reread_the_stream(
    redis: Any, keys: Keys, fanout: SessionFanout
) -> None:
    """(Replaces the XREAD readers' seq-jump check.) Entries written but never announced,
    then a batch whose ``prev_id`` is past what the feed delivered: the feed reads the stream
    from its cursor, and the connection gets everything once, in order."""
    writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
    await writer.tokens(2)
    conn = ClientConnection(writer.sid, "sse", 1000)
    got = asyncio.create_task(texts(fanout, conn, None, 7))
    await until(lambda: conn.events_sent >= 2)
    for seq in (3, 4):  # not announced: as if the message was lost
        fields = {"v": "1", "kind": "token", "gen": writer.gen, "seq": str(seq), "ts": "1",
                  "text": f"t{seq}"}  # fmt: skip
        await redis.xadd(keys.events(writer.sid), fields)
    writer.seq, writer.state = 4, "running 2"
    repairs = fanout.stats.repairs
    await writer.tokens(3)
    assert await got == expected(1, 7)
    assert fanout.stats.repairs == repairs + 1


async def test_the_append_reply_counts_the_gateways_subscribed(
    redis: Any, keys: Keys, fanout: SessionFanout
) -> None:
    """What the orphan rule reads (``producer/orphans.py``): 0 with nobody subscribed, one
    per gateway process whose feed holds the session (two fan-outs here), -1 for a batch
    that was written before (nothing published)."""
    writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
    await writer.tokens(1)
    assert writer.readers == 0
    assert await texts(fanout, ClientConnection(writer.sid, "sse", 1000), None, 1) == ["t1"]
    await writer.tokens(1)
    assert writer.readers == 1
    other = SessionFanout(redis, Scripts(redis), keys, history_batch=5, probe_s=1.0)
    task = asyncio.create_task(other.run())
    try:
        await until(lambda: other._group is not None)
        assert await texts(other, ClientConnection(writer.sid, "sse", 1000), None, 2) == [
            "t1", "t2",
        ]  # fmt: skip
        await writer.tokens(1)
        assert writer.readers == 2
    finally:
        other.stop()
        async with asyncio.timeout(10):
            await task
    writer.seq, writer.state = 2, "running 2"
    await writer.tokens(1)  # the same batch again: written before, not published
    assert writer.readers == -1


async def test_a_batch_sent_again_is_written_once(redis: Any, keys: Keys) -> None:
    """A retry after a lost reply (a failover): the script knows the batch by its state."""
    writer = Writer(redis, keys, "s_" + secrets.token_hex(6))
    await writer.tokens(2)
    writer.seq, state = 0, writer.state
    writer.state = ""
    await writer.tokens(2)  # the same batch again: same state, same events
    assert writer.state == state
    assert await redis.xlen(keys.events(writer.sid)) == 2


async def test_a_resume_id_found_by_string_gives_what_comparing_ids_gives() -> None:
    """from_memory finds an id the feed delivered by string (no id parsed); for every id,
    delivered or not, the history is what comparing ids gives, and None outside the memory."""
    ids = ["1700-3", "1700-4", "1701-0", "1702-7"]
    recent = collections.deque(
        Frame(i, "e", Event("token", "g_1", n, text="x")) for n, i in enumerate(ids)
    )
    future = asyncio.get_running_loop().create_future()
    feed = _Feed("s", b"c", future, epoch="e", cursor=ids[-1], recent=recent, recent_base="1700-2")
    for asked in ["1700-2", *ids, "1700-5", "1701-9", "1699-0", "1703-0", "1702-8"]:
        after = parse_entry_id(asked)
        inside = parse_entry_id("1700-2") <= after <= parse_entry_id(ids[-1])
        want = [i for i in ids if parse_entry_id(i) > after] if inside else None
        opening = from_memory(feed, ("e", asked))
        got = None if opening is None else [f.entry_id for b in opening.history for f in b.frames]
        assert got == want, asked
        fast = _after_delivered(feed, asked)
        assert fast is None or [f.entry_id for f in fast] == want, asked
    assert from_memory(feed, ("other", ids[0])) is None


async def test_reads_waiting_when_the_fanout_stops_fail_instead_of_hanging(
    redis: Any, keys: Keys
) -> None:
    fan = SessionFanout(redis, Scripts(redis), keys)
    task = asyncio.create_task(fan.run())
    await asyncio.sleep(0)  # run() has its task group
    reads = [asyncio.create_task(fan.reads.read(f"s_{i}", "-", 10)) for i in range(3)]
    await asyncio.sleep(0)  # queued; their pipeline task is created, not started
    task.cancel()  # what a cancelled lifespan does to the fan-out's task group
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        done = await asyncio.gather(*reads, return_exceptions=True)
    assert [type(r) for r in done] == [ConnectionError] * 3, done
