"""A new encoding is one small module: a plain-text-lines encoder registered here, in the test,
streams a session over a real socket through the same seam as SSE (subscribe, history, live)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.routing import Route

from tests.servers import Gateway
from tests.test_token_path import collect_until_end, start
from tokenbridge.gateway import encodings
from tokenbridge.gateway.encodings import Chunk, Encoder, StreamContext
from tokenbridge.gateway.frames import Batch
from tokenbridge.gateway.sse import EventStreamResponse
from tokenbridge.gateway.state import Gateway as GatewayState
from tokenbridge.settings import Settings


@dataclass(frozen=True)
class LinesOptions:
    """The toy encoding's typed options."""

    generation_id: str


class _LinesEncoder:
    """Per connection: numbers its lines, ends the response after its generation's end."""

    def __init__(self, options: LinesOptions) -> None:
        self.options = options
        self.line = 0
        self.finished = False

    def _out(self, text: str) -> bytes:
        self.line += 1
        return f"{self.line} {text}\n".encode()

    def preamble(self) -> Chunk | None:
        return self._out("hello")

    def gap(self, info: dict[str, Any]) -> Chunk | None:
        return self._out(f"gap {info['reason']}")

    def encode(self, batches: list[Batch]) -> Chunk | None:
        out = b""
        for batch in batches:
            for frame in batch.frames:
                event = frame.event
                if event.generation_id != self.options.generation_id:
                    continue
                if event.kind == "token":
                    out += self._out(f"token {event.text}")
                elif event.kind in ("end", "error"):
                    out += self._out(f"{event.kind} {event.reason or event.code}")
                    self.finished = True
        return out or None  # a start event writes nothing

    def keepalive(self) -> Chunk | None:
        return None

    def closing(self, reason: str) -> Chunk | None:
        return self._out(f"bye {reason}")


class Lines:
    name = "test_lines"
    transport = "sse"
    media_type = "text/plain"

    def open(self, ctx: StreamContext) -> Encoder:
        assert isinstance(ctx.options, LinesOptions)
        return _LinesEncoder(ctx.options)


async def lines_route(request: Request) -> EventStreamResponse:
    gateway: GatewayState = request.state.gateway
    session_id = request.path_params["session_id"]
    stream = gateway.open_stream(session_id, "sse", None)
    options = LinesOptions(request.query_params["generation_id"])
    encoder = encodings.get("test_lines").open(StreamContext(session_id, options))
    return EventStreamResponse(stream, encoder, None, media_type="text/plain")


@pytest.fixture
def lines_encoding() -> Iterator[None]:
    encodings.register(Lines())
    yield
    encodings.unregister("test_lines")


async def test_a_registered_encoding_streams_a_session_over_a_socket(
    settings: Settings, lines_encoding: None
) -> None:
    gateway = Gateway(settings)
    gateway.app.router.routes.insert(0, Route("/lines/{session_id}", lines_route))
    async with gateway, httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        started = await start(http, params={"max_tokens": 5, "rate": 0})
        session_id, gen = started["session_id"], started["generation_id"]
        async with asyncio.timeout(30):
            sse = await collect_until_end(http, started["events_url"], gen)
            response = await http.get(f"/lines/{session_id}", params={"generation_id": gen})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    tokens = [e.data["text"] for e in sse if e.event == "token"]
    end = sse[-1].data["reason"]
    expected = ["hello", *(f"token {t}" for t in tokens), f"end {end}", "bye done"]
    assert response.text.splitlines() == [f"{n} {line}" for n, line in enumerate(expected, 1)]


def test_encoding_names_are_unique() -> None:
    assert {"native_sse", "websocket"} <= set(encodings.names())
    with pytest.raises(ValueError, match="already registered"):
        encodings.register(encodings.get("native_sse"))
