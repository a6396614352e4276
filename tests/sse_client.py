"""A small SSE client for the tests, over httpx (real sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenbridge.sse_parser import parse_sse

__all__ = ["SSEEvent", "read_events"]


@dataclass
class SSEEvent:
    event: str
    data: dict[str, Any]
    id: str | None = None
    comments: list[str] = field(default_factory=list)


async def read_events(
    client: httpx.AsyncClient,
    url: str,
    last_event_id: str | None = None,
    raw_comments: list[str] | None = None,
) -> AsyncIterator[SSEEvent]:
    """Yield each SSE event of ``url`` until the server closes the stream."""
    headers = {"accept": "text/event-stream"}
    if last_event_id is not None:
        headers["last-event-id"] = last_event_id
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for message in parse_sse(response.aiter_lines(), comments=raw_comments):
            yield SSEEvent(message.event, json.loads(message.data), message.id)
