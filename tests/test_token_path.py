"""The token path end to end: POST a generation, read it over SSE, resume exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import BOTH
from tests.sse_client import SSEEvent, read_events


async def start(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    payload = {"model": "demo", "prompt": "hello there", "params": {"max_tokens": 20, "rate": 0}}
    payload.update(body)
    response = await http.post("/v1/generations", json=payload)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


async def collect_until_end(
    http: httpx.AsyncClient,
    url: str,
    generation_id: str,
    last_event_id: str | None = None,
    limit: int | None = None,
) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    async for ev in read_events(http, url, last_event_id):
        events.append(ev)
        if ev.event in ("end", "error") and ev.data.get("generation_id") == generation_id:
            break
        if limit is not None and len(events) >= limit:
            break
    return events


@BOTH
async def test_tokens_arrive_in_order_with_contiguous_seq(http: httpx.AsyncClient) -> None:
    started = await start(http)
    async with asyncio.timeout(20):
        events = await collect_until_end(http, started["events_url"], started["generation_id"])
    assert [e.event for e in events] == ["start"] + ["token"] * 20 + ["end"]
    assert [e.data["seq"] for e in events] == list(range(22))
    assert events[-1].data["tokens"] == 20
    assert all(e.id and ":" in e.id for e in events)
