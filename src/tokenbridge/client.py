"""Python SDK: start a generation and stream its events, resuming by itself after a drop.

    async with TokenBridgeClient("http://127.0.0.1:8000") as tb:
        started = await tb.start_generation("Tell me a story", model="demo")
        async for event in tb.stream(started):
            if event.event == "token":
                print(event.data["text"], end="")

:meth:`TokenBridgeClient.stream` follows one generation to its terminal event (``end`` or
``error``). When the connection drops it reconnects with the last event id it saw, so the
caller gets every event once and in order; ``gap`` events (history lost) are passed through.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from tokenbridge.exceptions import InvalidRequest, TokenBridgeError
from tokenbridge.sse_parser import parse_sse

__all__ = ["GenerationStarted", "StreamEvent", "TokenBridgeClient"]


@dataclass(frozen=True, slots=True)
class GenerationStarted:
    """What ``POST /v1/generations`` answered."""

    session_id: str
    generation_id: str
    events_url: str


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One SSE event: its name, its JSON data and its id (None for ``gap``)."""

    event: str
    data: dict[str, Any]
    id: str | None


class TokenBridgeClient:
    """A client of one tokenbridge gateway; ``max_reconnects`` bounds resumes per stream.

    ``api_key`` is sent as a Bearer header to start generations; streams use the subscribe
    token that came with each generation (in its ``events_url``).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout_s: float = 30.0,
        max_reconnects: int = 20,
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_reconnects = max_reconnects
        self.reconnects = 0
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=httpx.Timeout(timeout_s, read=None), headers=headers
        )

    async def __aenter__(self) -> TokenBridgeClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def start_generation(
        self,
        prompt: str | None = None,
        *,
        model: str = "demo",
        messages: list[dict[str, str]] | None = None,
        session_id: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> GenerationStarted:
        """Queue a generation; raises :class:`InvalidRequest` with the server's code on 4xx."""
        body: dict[str, Any] = {"model": model}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt or ""
        if session_id is not None:
            body["session_id"] = session_id
        if params:
            body["params"] = params
        response = await self._http.post("/v1/generations", json=body)
        if response.status_code != 202:
            raise _error_from(response)
        data = response.json()
        return GenerationStarted(data["session_id"], data["generation_id"], data["events_url"])

    async def stream(
        self, started: GenerationStarted, last_event_id: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Yield the generation's events to its ``end``/``error``, resuming after drops."""
        attempts = 0
        while True:
            try:
                async for event in self._read(started.events_url, last_event_id):
                    attempts = 0
                    if event.id is not None:
                        last_event_id = event.id
                    if event.data.get("generation_id") not in (None, started.generation_id):
                        continue  # another generation of the same session
                    yield event
                    if event.event in ("end", "error"):
                        return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                pass
            attempts += 1
            self.reconnects += 1
            if attempts > self.max_reconnects:
                raise TokenBridgeError(
                    f"lost the stream of {started.generation_id} {attempts} times in a row; "
                    f"resume later with last_event_id={last_event_id!r}"
                )
            await asyncio.sleep(min(2.0, 0.05 * 2**attempts) * random.uniform(0.5, 1.0))

    async def _read(self, url: str, last_event_id: str | None) -> AsyncIterator[StreamEvent]:
        headers = {"accept": "text/event-stream"}
        if last_event_id:
            headers["last-event-id"] = last_event_id
        async with self._http.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise _error_from(response)
            async for message in parse_sse(response.aiter_lines()):
                yield StreamEvent(message.event, json.loads(message.data), message.id)


def _error_from(response: httpx.Response) -> InvalidRequest:
    try:
        error = response.json()["error"]
        return InvalidRequest(error["code"], error["message"], response.status_code)
    except (ValueError, KeyError, TypeError):
        return InvalidRequest("http_error", f"HTTP {response.status_code}", response.status_code)
