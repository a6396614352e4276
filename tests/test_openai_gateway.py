"""The gateway with an ``openai`` model entry, against a real local OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.model_server import Answer, FailMidStream, ModelServer, Stall
from tests.servers import Gateway
from tests.sse_client import SSEEvent, read_events


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as srv:
        yield srv


async def generate(settings: Any, prompt: str) -> list[SSEEvent]:
    """POST a generation of model ``local`` and read its events to ``end``/``error``."""
    async with (
        Gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        response = await http.post("/v1/generations", json={"model": "local", "prompt": prompt})
        assert response.status_code == 202, response.text
        started = response.json()
        events: list[SSEEvent] = []
        stream = read_events(http, started["events_url"])
        async with asyncio.timeout(15), contextlib.aclosing(stream):
            async for ev in stream:
                assert ev.data["generation_id"] == started["generation_id"]
                events.append(ev)
                if ev.event in ("end", "error"):
                    break
    assert [e.data["seq"] for e in events] == list(range(len(events)))
    return events


async def test_answer_streams_with_usage(model_server: ModelServer, settings_factory: Any) -> None:
    model_server.reply = Answer(tokens=("Hello", ",", " world", "!"))
    settings = settings_factory(models={"local": model_server.model_config()})
    events = await generate(settings, "say hello please")
    assert [e.event for e in events] == ["start", "token", "token", "token", "token", "end"]
    assert events[0].data["model"] == "local"
    assert "".join(e.data["text"] for e in events[1:-1]) == "Hello, world!"
    end = events[-1].data
    assert end["reason"] == "stop" and end["tokens"] == 4
    assert end["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    [request] = model_server.requests
    assert request["model"] == model_server.model and request["stream"] is True
    assert request["messages"] == [{"role": "user", "content": "say hello please"}]


async def test_length_finish_reason(model_server: ModelServer, settings_factory: Any) -> None:
    model_server.reply = Answer(tokens=("a", "b"), finish_reason="length")
    settings = settings_factory(models={"local": model_server.model_config()})
    events = await generate(settings, "count")
    assert [e.event for e in events] == ["start", "token", "token", "end"]
    assert events[-1].data["reason"] == "length" and events[-1].data["tokens"] == 2


async def test_error_mid_stream_follows_the_tokens(
    model_server: ModelServer, settings_factory: Any
) -> None:
    model_server.reply = FailMidStream(tokens=("Hel", "lo"), message="the model crashed")
    settings = settings_factory(models={"local": model_server.model_config()})
    events = await generate(settings, "hi")
    assert [e.event for e in events] == ["start", "token", "token", "error"]
    assert [e.data["text"] for e in events[1:3]] == ["Hel", "lo"]
    error = events[-1].data
    assert error["code"] == "provider_error"
    assert "the model crashed" in error["message"]


async def test_stall_becomes_provider_timeout(
    model_server: ModelServer, settings_factory: Any
) -> None:
    model_server.reply = Stall(tokens=("Hi",))
    config = model_server.model_config(timeout_s=0.3)
    events = await generate(settings_factory(models={"local": config}), "hi")
    assert [e.event for e in events] == ["start", "token", "error"]
    assert events[1].data["text"] == "Hi"
    assert events[-1].data["code"] == "provider_timeout"
    assert events[-1].data["message"]
