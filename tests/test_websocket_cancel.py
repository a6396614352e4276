"""WebSocket transport (same events as SSE, resume) and cancel from any node."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import BOTH
from tests.servers import Gateway, GatewayProcess
from tests.test_resume import assert_complete
from tests.test_token_path import collect_until_end, start
from tokenbridge.settings import Settings


def ws_url(gateway_url: str, session_id: str, last_event_id: str | None = None) -> str:
    url = gateway_url.replace("http://", "ws://") + f"/v1/sessions/{session_id}/ws"
    return url + (f"?last_event_id={last_event_id}" if last_event_id else "")


async def ws_events(
    ws: ClientConnection, generation_id: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """Events until the generation's terminal one (or ``limit`` events)."""
    events: list[dict[str, Any]] = []
    while True:
        message = json.loads(await ws.recv())
        for item in message if isinstance(message, list) else [message]:
            if "event" not in item:
                continue  # control messages (pong, cancel acks)
            events.append(item)
            data = item["data"]
            if item["event"] in ("end", "error") and data.get("generation_id") == generation_id:
                return events
            if limit is not None and len(events) >= limit:
                return events


async def test_websocket_and_sse_clients_get_identical_events(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    started = await start(http, params={"max_tokens": 100, "rate": 500})
    gen = started["generation_id"]
    async with asyncio.timeout(30), connect(ws_url(gateway.url, started["session_id"])) as ws:
        sse, wse = await asyncio.gather(
            collect_until_end(http, started["events_url"], gen), ws_events(ws, gen)
        )
    assert [(e.id, e.event, e.data) for e in sse] == [(w["id"], w["event"], w["data"]) for w in wse]
    assert_complete(sse, gen, 100)


async def test_websocket_resume_after_drop_no_gap_no_duplicate(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    started = await start(http, params={"max_tokens": 200, "rate": 400})
    sid, gen = started["session_id"], started["generation_id"]
    async with asyncio.timeout(30):
        async with connect(ws_url(gateway.url, sid)) as ws:
            first = await ws_events(ws, gen, limit=25)
        async with connect(ws_url(gateway.url, sid)) as ws:  # resume by message this time
            await ws.send(json.dumps({"type": "resume", "last_event_id": first[-1]["id"]}))
            rest = await ws_events(ws, gen)
    events = first + rest
    mine = [e for e in events if e["data"].get("generation_id") == gen]
    assert [e["data"]["seq"] for e in mine] == list(range(202))


@BOTH
async def test_delete_cancels_a_running_generation(http: httpx.AsyncClient) -> None:
    started = await start(http, params={"max_tokens": 100_000, "rate": 50})
    gen = started["generation_id"]
    async with asyncio.timeout(30):
        early = await collect_until_end(http, started["events_url"], gen, limit=3)
        response = await http.delete(f"/v1/generations/{gen}")
        assert response.status_code == 202, response.text
        rest = await collect_until_end(http, started["events_url"], gen, last_event_id=early[-1].id)
    end = rest[-1]
    assert end.event == "end" and end.data["reason"] == "cancelled"
    assert end.data["tokens"] == end.data["seq"] - 1
    again = await http.delete(f"/v1/generations/{gen}")
    assert again.status_code == 409 and again.json()["error"]["code"] == "generation_finished"
    missing = await http.delete("/v1/generations/g_nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "generation_not_found"


@BOTH
async def test_cancel_from_a_second_gateway_process(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    started = await start(http, params={"max_tokens": 100_000, "rate": 50})
    gen = started["generation_id"]
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
            await other.wait_ready()
            async with httpx.AsyncClient(base_url=other.url) as second:
                response = await second.delete(f"/v1/generations/{gen}")
            assert response.status_code == 202, response.text
            events = await collect_until_end(http, started["events_url"], gen)
    finally:
        other.stop()
    assert events[-1].data["reason"] == "cancelled"


async def test_websocket_cancel_message(gateway: Gateway, http: httpx.AsyncClient) -> None:
    started = await start(http, params={"max_tokens": 100_000, "rate": 50})
    sid, gen = started["session_id"], started["generation_id"]
    async with asyncio.timeout(30), connect(ws_url(gateway.url, sid)) as ws:
        await ws_events(ws, gen, limit=2)
        await ws.send(json.dumps({"type": "cancel", "generation_id": gen}))
        events = await ws_events(ws, gen)
    assert events[-1]["event"] == "end" and events[-1]["data"]["reason"] == "cancelled"


async def test_cancel_before_the_job_starts(settings_factory: Any) -> None:
    settings = settings_factory(run_worker=False)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        started = await start(http, params={"max_tokens": 10})
        response = await http.delete(f"/v1/generations/{started['generation_id']}")
        assert response.status_code == 202
        async with Gateway(settings, worker=True), asyncio.timeout(30):  # a worker arrives
            events = await collect_until_end(http, started["events_url"], started["generation_id"])
    assert [e.event for e in events] == ["start", "end"]
    assert events[-1].data["reason"] == "cancelled"


async def test_websocket_bad_session_id_is_closed_with_policy_violation(gateway: Gateway) -> None:
    async with connect(ws_url(gateway.url, "bad$id")) as ws:
        await ws.wait_closed()
    assert ws.close_code == 1008


async def test_websocket_binary_message_closes_with_unsupported_data(gateway: Gateway) -> None:
    async with asyncio.timeout(30), connect(ws_url(gateway.url, "bin-session")) as ws:
        await ws.send(b"\x00\x01")
        await ws.wait_closed()
    assert ws.close_code == 1003 and ws.close_reason == "binary_message"


async def test_websocket_ping_message_is_answered(gateway: Gateway) -> None:
    async with asyncio.timeout(30), connect(ws_url(gateway.url, "ping-session")) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        while (message := json.loads(await ws.recv())).get("type") != "pong":
            assert "event" in message  # only session events before the pong
