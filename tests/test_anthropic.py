"""AnthropicChatModel against tests/anthropic_server.py (a real socket), and end to end."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.anthropic_server import AnthropicServer
from tests.model_server import Answer, FailMidStream, HttpError, Stall
from tests.servers import Gateway
from tests.test_models import chat, collect
from tests.test_token_path import collect_until_end, start
from tokenbridge.exceptions import ProviderError, ProviderTimeout
from tokenbridge.model_config import ModelConfig
from tokenbridge.producer.models import (
    AnthropicChatModel,
    ChatRequest,
    GenerationParams,
    build_model,
)

KEY_ENV = "TB_TEST_ANTHROPIC_KEY"
SECRET = "sk-ant-test-0123456789abcdef"

MakeModel = Callable[..., Awaitable[AnthropicChatModel]]


@pytest.fixture
def server() -> Iterator[AnthropicServer]:
    with AnthropicServer() as srv:
        yield srv


@pytest.fixture
async def anthropic_model() -> AsyncIterator[MakeModel]:
    """Build AnthropicChatModels that are all closed after the test."""
    made: list[AnthropicChatModel] = []

    async def make(config: ModelConfig, name: str = "claude") -> AnthropicChatModel:
        model = AnthropicChatModel(name, config)
        made.append(model)
        return model

    yield make
    for model in made:
        await model.aclose()


async def test_build_model_picks_anthropic() -> None:
    model = build_model("claude", ModelConfig(adapter="anthropic", model="claude-x"))
    try:
        assert isinstance(model, AnthropicChatModel)
        assert model.upstream == "claude-x"
    finally:
        await model.aclose()


async def test_streams_text_deltas_then_usage(
    server: AnthropicServer, anthropic_model: MakeModel
) -> None:
    model = await anthropic_model(server.model_config())
    texts, finish = await collect(model, chat("one two three"))
    assert texts == ["Hello", ",", " world", "!"]
    assert finish is not None and finish.reason == "stop"
    assert finish.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


async def test_max_tokens_stop_reason_is_length(
    server: AnthropicServer, anthropic_model: MakeModel
) -> None:
    server.reply = Answer(tokens=("a", "b"), finish_reason="length")
    model = await anthropic_model(server.model_config())
    texts, finish = await collect(model, chat(max_tokens=2))
    assert texts == ["a", "b"]
    assert finish is not None and finish.reason == "length"


async def test_request_body_and_headers(
    server: AnthropicServer, anthropic_model: MakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    model = await anthropic_model(server.model_config(api_key_env=KEY_ENV))
    request = ChatRequest(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "and kind"},
            {"role": "user", "content": "again"},
        ],
        params=GenerationParams(temperature=0.0, top_p=0.5, stop=["END"], seed=7, rate=5.0),
    )
    await collect(model, request)
    body, headers = server.requests[0], server.headers[0]
    assert body == {
        "model": "claude-test",
        "system": "be brief\n\nand kind",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
        "max_tokens": 4096,
        "stream": True,
        "temperature": 0.0,
        "top_p": 0.5,
        "stop_sequences": ["END"],
    }
    assert headers["x-api-key"] == SECRET
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers


async def test_error_event_mid_stream(server: AnthropicServer, anthropic_model: MakeModel) -> None:
    server.reply = FailMidStream(tokens=("Hel", "lo"), message="Overloaded")
    model = await anthropic_model(server.model_config())
    seen: list[str] = []
    with pytest.raises(ProviderError) as info:
        await collect(model, chat(), into=seen)
    assert seen == ["Hel", "lo"]
    assert info.value.code == "provider_error"
    assert "overloaded_error: Overloaded" in str(info.value)


async def test_stream_without_message_stop_is_a_bad_response(
    server: AnthropicServer, anthropic_model: MakeModel
) -> None:
    server.reply = Answer(done=False)
    model = await anthropic_model(server.model_config())
    with pytest.raises(ProviderError) as info:
        await collect(model, chat())
    assert info.value.code == "provider_bad_response"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, "provider_unauthorized"),
        (403, "provider_unauthorized"),
        (429, "provider_rate_limited"),
        (400, "provider_http_4xx"),
        (500, "provider_http_5xx"),
        (529, "provider_http_5xx"),
    ],
)
async def test_http_errors_have_stable_codes_and_hide_the_key(
    server: AnthropicServer,
    anthropic_model: MakeModel,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    code: str,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    # A provider that echoes the key back must not get it into our message.
    server.reply = HttpError(status=status, message=f"bad key {SECRET}")
    model = await anthropic_model(server.model_config(api_key_env=KEY_ENV))
    with pytest.raises(ProviderError) as info:
        await collect(model, chat())
    assert info.value.code == code
    assert f"HTTP {status}" in str(info.value)
    assert SECRET not in str(info.value)
    assert "***" in str(info.value)


async def test_stall_times_out(server: AnthropicServer, anthropic_model: MakeModel) -> None:
    server.reply = Stall(tokens=("partial",))
    model = await anthropic_model(server.model_config(timeout_s=0.3))
    seen: list[str] = []
    with pytest.raises(ProviderTimeout) as info:
        await collect(model, chat(), into=seen)
    assert seen == ["partial"]
    assert info.value.code == "provider_timeout"


async def test_unreachable(anthropic_model: MakeModel) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        config = ModelConfig(adapter="anthropic", base_url=f"http://127.0.0.1:{port}/v1")
        model = await anthropic_model(config)
        with pytest.raises(ProviderError) as info:
            await collect(model, chat())
    assert info.value.code == "provider_unreachable"


async def test_generation_through_the_gateway(settings_factory: Any) -> None:
    """POST /v1/generations on an anthropic model: its tokens reach the client over SSE."""
    with AnthropicServer(Answer(tokens=("Bon", "jour"))) as srv:
        settings = settings_factory(models={"claude": srv.model_config()})
        async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
            started = await start(http, model="claude", prompt="say hi", params={})
            async with asyncio.timeout(10):
                events = await collect_until_end(
                    http, started["events_url"], started["generation_id"]
                )
    assert [e.data["text"] for e in events if e.event == "token"] == ["Bon", "jour"]
    assert events[-1].event == "end"
    assert events[-1].data["reason"] == "stop"
    assert events[-1].data["usage"]["completion_tokens"] == 2
