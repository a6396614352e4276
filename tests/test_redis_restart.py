"""Redis stopped and started again (data lost) under a live gateway and worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.servers import Gateway, RedisServer
from tests.test_token_path import collect_until_end, start
from tokenbridge.store.client import close_client, command_client


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_gateway_and_worker_reconnect_and_serve_new_generations(
    own_redis: RedisServer, settings_factory: Any
) -> None:
    settings = settings_factory(redis_url=own_redis.url, consumer_block_ms=500)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        before = await start(http, params={"max_tokens": 5, "rate": 0})
        async with asyncio.timeout(30):
            events = await collect_until_end(http, before["events_url"], before["generation_id"])
        assert events[-1].event == "end"
        old_last_id = events[-1].id

        own_redis.restart()  # SIGKILL, then a new empty server on the same port

        async with asyncio.timeout(60):
            # The first request may meet a dead pooled connection; the pool retries once.
            while True:
                response = await http.post(
                    "/v1/generations",
                    json={"model": "demo", "prompt": "again", "params": {"max_tokens": 7}},
                )
                if response.status_code == 202:
                    break
                assert response.status_code == 503, response.text  # Redis not back yet
                assert response.json()["error"]["code"] == "redis_unavailable"
            after = response.json()
            events = await collect_until_end(http, after["events_url"], after["generation_id"])
            assert [e.data["seq"] for e in events] == list(range(9)), [
                (e.id, e.event, e.data) for e in events
            ]
            # A client of the old session resuming learns that its history is gone.
            gap = await collect_until_end(
                http, before["events_url"], "-", last_event_id=old_last_id, limit=1
            )
        assert gw.runtime.worker.generations_done == 2
        assert gap[0].event == "gap" and gap[0].data["reason"] == "expired"


async def test_the_command_client_retries_on_a_connection_redis_closed(
    own_redis: RedisServer,
) -> None:
    """After a restart every pooled connection is dead: the first command on each is
    answered by a closed socket, and the client's retry (on a new connection) must take it.
    (With redis-py's synchronous ``Retry`` on the asyncio client nothing was retried.)"""
    redis = command_client(own_redis.url, 4, 10)
    try:
        await asyncio.gather(*(redis.execute_command("PING") for _ in range(4)))  # 4 pooled
        for _ in range(3):
            own_redis.restart()  # SIGKILL, then a new empty server on the same port
            replies = await asyncio.gather(*(redis.eval("return 7", 0) for _ in range(4)))
            assert replies == [7, 7, 7, 7]
    finally:
        await close_client(redis)
