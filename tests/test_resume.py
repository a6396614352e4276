"""Exact resume: a client that drops gets the rest with no gap and no duplicate, on any node."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.conftest import BOTH
from tests.servers import Gateway, GatewayProcess
from tests.sse_client import SSEEvent, read_events
from tests.test_live_fanout import until
from tests.test_token_path import collect_until_end, start
from tokenbridge.settings import Settings
from tokenbridge.store.client import cluster_url
from tokenbridge.wire.keys import Keys


def assert_complete(events: list[SSEEvent], generation_id: str, tokens: int) -> None:
    """One generation's events: start, every token, end; seq 0..n contiguous, ids increasing."""
    mine = [e for e in events if e.data.get("generation_id") == generation_id]
    assert [e.data["seq"] for e in mine] == list(range(tokens + 2))
    assert mine[0].event == "start" and mine[-1].event == "end"
    ids = [e.id for e in mine]
    assert len(set(ids)) == len(ids)


@BOTH
async def test_drop_and_resume_same_gateway(http: httpx.AsyncClient) -> None:
    started = await start(http, params={"max_tokens": 200, "rate": 400})
    url, gen = started["events_url"], started["generation_id"]
    async with asyncio.timeout(30):
        first = await collect_until_end(http, url, gen, limit=30)
        assert first[-1].event == "token"
        rest = await collect_until_end(http, url, gen, last_event_id=first[-1].id)
    assert rest[0].data["seq"] == first[-1].data["seq"] + 1
    assert_complete(first + rest, gen, 200)


@BOTH
async def test_resume_on_a_second_gateway_process(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    started = await start(http, params={"max_tokens": 300, "rate": 300})
    url, gen = started["events_url"], started["generation_id"]
    other = GatewayProcess(
        {
            "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
            "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
        },
        args=["serve", "--no-worker", "--log-level", "warning"],
    )
    other.args += ["--port", str(other.port)]
    other.start()
    try:
        async with asyncio.timeout(60):
            first = await collect_until_end(http, url, gen, limit=40)
            await other.wait_ready()
            async with httpx.AsyncClient(base_url=other.url, timeout=30) as second:
                rest = await collect_until_end(second, url, gen, last_event_id=first[-1].id)
    finally:
        other.stop()
    assert_complete(first + rest, gen, 300)


@BOTH
async def test_two_connections_of_one_session_get_everything(http: httpx.AsyncClient) -> None:
    started = await start(http, params={"max_tokens": 300, "rate": 1000})
    url, gen = started["events_url"], started["generation_id"]
    async with asyncio.timeout(30):
        a, b = await asyncio.gather(
            collect_until_end(http, url, gen), collect_until_end(http, url, gen)
        )
    assert_complete(a, gen, 300)
    assert [(e.id, e.data) for e in a] == [(e.id, e.data) for e in b]


@BOTH
async def test_later_generations_of_a_session_follow_on_one_stream(
    http: httpx.AsyncClient,
) -> None:
    first = await start(http, params={"max_tokens": 5, "rate": 0})
    events: list[SSEEvent] = []
    second: dict[str, Any] = {}
    async with asyncio.timeout(30):
        async for ev in read_events(http, first["events_url"]):
            events.append(ev)
            if ev.event == "end" and ev.data["generation_id"] == first["generation_id"]:
                second = await start(
                    http, session_id=first["session_id"], params={"max_tokens": 7, "rate": 0}
                )
            if second and ev.event == "end" and ev.data["generation_id"] == second["generation_id"]:
                break
    assert_complete(events, first["generation_id"], 5)
    assert_complete(events, second["generation_id"], 7)


def _redis(settings: Settings) -> Any:
    """A client that ``async with`` closes, for standalone Redis or the cluster."""
    url, cluster = cluster_url(settings.redis_url_value() or "")
    return aioredis.RedisCluster.from_url(url) if cluster else aioredis.Redis.from_url(url)


async def test_resume_past_trimmed_history_gets_a_gap_event(settings_factory: Any) -> None:
    # No recent events kept in the gateway: they would still hold what Redis trimmed (and
    # the client would get it all, with no gap to report).
    settings = settings_factory(stream_max_len=10, fanout_recent_events=0)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params={"max_tokens": 30, "rate": 0})
        url, gen = started["events_url"], started["generation_id"]
        async with asyncio.timeout(30):
            early = await collect_until_end(http, url, gen, limit=3)
            await collect_until_end(http, url, gen)  # the generation has ended
            # Trim hard so that the entries right after `early[-1]` are gone.
            client = _redis(settings)
            async with client:
                await client.xtrim(
                    Keys(settings.key_prefix).events(started["session_id"]), 5, approximate=False
                )
            rest = await collect_until_end(http, url, gen, last_event_id=early[-1].id)
    assert rest[0].event == "gap"
    assert rest[0].data["reason"] == "trimmed"
    assert rest[0].data["last_event_id"] == early[-1].id
    tail = rest[1:]
    assert len(tail) == 5 and tail[-1].event == "end"
    assert [e.data["seq"] for e in tail] == list(range(27, 32))


async def test_resume_after_expiry_gets_a_gap_event(settings_factory: Any) -> None:
    # The feed does not linger: a feed that heard the stream lately vouches for it (a real
    # expiry cannot come that soon, see gateway/opening.py); the DEL below could.
    settings: Settings = settings_factory(fanout_linger_s=0)
    async with (
        Gateway(settings) as gateway,
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
        asyncio.timeout(30),
    ):
        await _expired_then_renewed(gateway, http, settings)


async def _expired_then_renewed(
    gateway: Gateway, http: httpx.AsyncClient, settings: Settings
) -> None:
    started = await start(http, params={"max_tokens": 3, "rate": 0})
    url, gen = started["events_url"], started["generation_id"]
    events = await collect_until_end(http, url, gen)
    fanout = gateway.app.state.gateway.fanout
    await until(lambda: not (fanout.session_count or fanout.lingering_count))  # within 1 s
    keys = Keys(settings.key_prefix)
    client = _redis(settings)
    async with client:  # what retention does, right now
        await client.delete(keys.events(started["session_id"]), keys.meta(started["session_id"]))
    gone = await collect_until_end(http, url, gen, last_event_id=events[-1].id, limit=1)
    later = await start(http, session_id=started["session_id"], params={"max_tokens": 2})
    await collect_until_end(http, url, later["generation_id"])  # the new stream exists
    rest = await collect_until_end(http, url, later["generation_id"], last_event_id=events[-1].id)
    assert gone[0].event == "gap" and gone[0].data["reason"] == "expired"
    assert rest[0].event == "gap"
    assert rest[0].data["reason"] == "epoch_changed"
    assert_complete(rest[1:], later["generation_id"], 2)


@pytest.mark.parametrize("n_sessions,per_session", [(100, 10)])
async def test_many_clients_use_a_bounded_number_of_redis_connections(
    gateway: Gateway, settings: Settings, n_sessions: int, per_session: int
) -> None:
    """1,000 SSE clients on 100 sessions: Redis connections stay within the configured bound."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        sessions = [f"bound-{i}" for i in range(n_sessions)]
        all_in = asyncio.Event()
        connected = 0

        async def client(session_id: str) -> int:
            nonlocal connected
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            try:  # closed however this ends (a failure, or the test's timeout cancelling it)
                writer.write(
                    f"GET /v1/sessions/{session_id}/events HTTP/1.1\r\nHost: x\r\n"
                    "Accept: text/event-stream\r\n\r\n".encode()
                )
                await writer.drain()
                await reader.readuntil(b"retry:")
                connected += 1
                if connected == n_sessions * per_session:
                    all_in.set()
                tokens = 0
                buffer = b""
                while b"event: end" not in buffer:
                    chunk = await reader.read(65536)
                    assert chunk, "server closed early"
                    buffer = buffer[-64:] + chunk
                    tokens += chunk.count(b"event: token")
                return tokens
            finally:
                writer.close()

        async with asyncio.timeout(90):
            tasks = [asyncio.create_task(client(s)) for s in sessions for _ in range(per_session)]
            await all_in.wait()
            redis = _redis(settings)
            async with redis:
                clients_before = await redis.client_list()
                for s in sessions:
                    await start(http, session_id=s, params={"max_tokens": 20, "rate": 200})
                counts = await asyncio.gather(*tasks)
                clients_after = await redis.client_list()
    assert counts == [20] * (n_sessions * per_session)
    name = gateway.runtime.client_name
    # The pool, one pub/sub connection (standalone Redis: one node), the worker's read loop.
    bound = settings.redis_max_connections + 1 + 1
    bound += settings.pipeline_shards  # + one read loop per pipeline shard (the processors)
    for listing in (clients_before, clients_after):
        ours = [c for c in listing if c.get("name") == name]
        assert 1 < len(ours) <= bound
    assert gateway.state.fanout.reader_count == 1


async def test_stream_renewed_under_a_live_connection_switches_epoch_without_gap(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    """Retention expired the session between two generations while a client stayed connected:
    the new generation reaches it with ids of the new epoch, and resuming from them works."""
    first = await start(http, params={"max_tokens": 3, "rate": 0})
    sid = first["session_id"]
    keys = Keys(settings.key_prefix)
    events: list[SSEEvent] = []
    second: dict[str, Any] = {}
    async with asyncio.timeout(30):
        async for ev in read_events(http, first["events_url"]):
            events.append(ev)
            if ev.event == "end" and ev.data["generation_id"] == first["generation_id"]:
                client = _redis(settings)
                async with client:  # what retention does
                    await client.delete(keys.events(sid), keys.meta(sid), keys.generations(sid))
                second = await start(http, session_id=sid, params={"max_tokens": 4, "rate": 0})
            if second and ev.event == "end" and ev.data["generation_id"] == second["generation_id"]:
                break
        tail = [e for e in events if e.data["generation_id"] == second["generation_id"]]
        assert tail[0].id is not None and events[0].id is not None
        assert tail[0].id.split(":")[0] != events[0].id.split(":")[0]  # a new epoch
        resumed = await collect_until_end(
            http, first["events_url"], second["generation_id"], last_event_id=tail[1].id
        )
    assert [e.event for e in resumed] == ["token", "token", "token", "end"]  # no gap event
    assert_complete(tail, second["generation_id"], 4)
