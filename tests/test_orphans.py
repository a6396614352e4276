"""The orphan rule: a generation no client reads on any gateway node for ``orphan_grace_s`` is
cancelled with end reason ``abandoned``; one read on another gateway process, or a
``background`` one, runs to its end. The grace is shortened to one second here (and the
gateway's ``fanout_linger_s``, which adds to it, to a fraction). Who reads is what the append
script's ``SPUBLISH`` answers, or, for a generation that published nothing lately, ``PUBSUB
SHARDNUMSUB``: on standalone Redis and on the cluster."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests.conftest import BOTH
from tests.servers import Gateway, GatewayProcess
from tests.test_token_path import collect_until_end, start
from tests.test_websocket_cancel import ws_events, ws_url
from tokenbridge.settings import Settings
from tokenbridge.wire.events import Event, decode_entry

pytestmark = BOTH

GRACE_S = 1.0
LINGER_S = 0.3
# Long enough to outlive the grace many times over: an abandoned one must stop early.
ENDLESS = {"max_tokens": 5000, "rate": 50}


async def terminal_event(gw: Gateway, session_id: str, generation_id: str) -> Event:
    """Wait for the generation's end (or error) by reading Redis directly: not a client, so
    it keeps nothing alive."""
    redis, key = gw.runtime.redis, gw.runtime.keys.events(session_id)
    cursor = "0-0"
    while True:
        reply: Any = await redis.xread({key: cursor}, count=1000, block=2000)
        for _, rows in reply or ():
            for entry_id, fields in rows:
                cursor = entry_id
                event = decode_entry(fields)
                if event.generation_id == generation_id and event.kind in ("end", "error"):
                    return event


async def test_stream_left_by_its_only_client_is_abandoned(settings_factory: Any) -> None:
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params=ENDLESS)
        url, gen = started["events_url"], started["generation_id"]
        async with asyncio.timeout(30):
            seen = await collect_until_end(http, url, gen, limit=10)  # then it goes away
            end = await terminal_event(gw, started["session_id"], gen)
        metrics = (await http.get("/metrics")).text
        worker = gw.runtime.worker
    assert [e.event for e in seen] == ["start"] + ["token"] * 9
    assert end.kind == "end" and end.reason == "abandoned"
    assert 9 <= end.tokens < ENDLESS["max_tokens"]
    assert worker.orphans.abandoned == 1
    assert "tokenbridge_generations_abandoned" in metrics


async def test_stream_never_read_is_abandoned_after_the_grace(settings_factory: Any) -> None:
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params=ENDLESS)
        async with asyncio.timeout(30):
            end = await terminal_event(gw, started["session_id"], started["generation_id"])
    assert end.kind == "end" and end.reason == "abandoned"
    assert end.tokens < ENDLESS["max_tokens"]


async def test_background_generation_is_never_abandoned(settings_factory: Any) -> None:
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    params = {"max_tokens": 120, "rate": 40}  # 3 s unread: three graces
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params=params, background=True)
        async with asyncio.timeout(30):
            end = await terminal_event(gw, started["session_id"], started["generation_id"])
    assert end.kind == "end" and end.reason == "length"
    assert end.tokens == 120
    assert gw.runtime.worker.orphans.abandoned == 0


async def test_client_on_another_gateway_process_keeps_it_alive(settings_factory: Any) -> None:
    """The worker runs here, with no client here; the only reader is on another process."""
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    other = GatewayProcess(
        {
            "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
            "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
            "TOKENBRIDGE_ORPHAN_GRACE_S": str(GRACE_S),
            "TOKENBRIDGE_FANOUT_LINGER_S": str(LINGER_S),
            "TOKENBRIDGE_RUN_PROCESSORS": "false",
        },
        args=["serve", "--no-worker", "--log-level", "warning"],
    )
    other.args += ["--port", str(other.port)]
    other.start()
    try:
        await other.wait_ready()
        async with (
            Gateway(settings) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
            httpx.AsyncClient(base_url=other.url, timeout=30) as remote,
        ):
            params = {"max_tokens": 120, "rate": 40}  # 3 s: three graces
            started = await start(http, params=params)
            async with asyncio.timeout(30):
                events = await collect_until_end(
                    remote, started["events_url"], started["generation_id"]
                )
            abandoned = gw.runtime.worker.orphans.abandoned
    finally:
        other.stop()
    assert events[-1].event == "end"
    assert events[-1].data["reason"] == "length"
    assert len([e for e in events if e.event == "token"]) == 120
    assert abandoned == 0


async def test_websocket_reader_keeps_it_alive(settings_factory: Any) -> None:
    """Presence is the connection manager's, whatever the transport."""
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params={"max_tokens": 120, "rate": 40})  # 3 s: three graces
        async with asyncio.timeout(30), connect(ws_url(gw.url, started["session_id"])) as ws:
            events = await ws_events(ws, started["generation_id"])
    assert events[-1]["event"] == "end"
    assert events[-1]["data"]["reason"] == "length"
    assert gw.runtime.worker.orphans.abandoned == 0


async def test_a_silent_generation_read_somewhere_is_not_abandoned(settings_factory: Any) -> None:
    """Nothing published for longer than the grace (a model thinking): the watch asks who is
    subscribed (``PUBSUB SHARDNUMSUB``, on the slot's node) and finds the reader."""
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    params = {"max_tokens": 2, "rate": 0.6}  # a token every 1.7 s: silent past the grace
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params=params)
        async with asyncio.timeout(30):
            events = await collect_until_end(http, started["events_url"], started["generation_id"])
        orphans = gw.runtime.worker.orphans
    assert events[-1].event == "end" and events[-1].data["reason"] == "length"
    assert orphans.asked > 0 and orphans.abandoned == 0


async def test_a_silent_generation_nobody_reads_is_abandoned(settings_factory: Any) -> None:
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    params = {"max_tokens": 50, "rate": 0.5}  # 100 s, a token every 2 s
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params=params)
        async with asyncio.timeout(30):
            end = await terminal_event(gw, started["session_id"], started["generation_id"])
        orphans = gw.runtime.worker.orphans
    assert end.kind == "end" and end.reason == "abandoned"
    assert end.tokens < 5 and orphans.asked > 0


async def test_a_request_waiting_for_its_whole_answer_keeps_it_alive(
    settings_factory: Any,
) -> None:
    """A non-streamed chat completion reads the session through the fan-out while it waits:
    its gateway is subscribed, so the batches reach a reader."""
    settings: Settings = settings_factory(orphan_grace_s=GRACE_S, fanout_linger_s=LINGER_S)
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 120,
        "rate": 40,  # 3 s: three graces
    }
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        reply = await http.post("/v1/chat/completions", json=body)
        abandoned = gw.runtime.worker.orphans.abandoned
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    assert abandoned == 0
