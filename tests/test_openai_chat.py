"""Chat Completions with the unmodified ``openai`` SDK against a real gateway on a socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.anthropic_server import AnthropicServer
from tests.model_server import Answer, ModelServer
from tests.servers import Gateway


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


async def test_non_stream(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=7,
        extra_body={"rate": 0},
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert choice.finish_reason == "length"
    assert len(choice.message.content.split()) == 7
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7 and completion.usage.prompt_tokens == 2


async def test_stream_with_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"rate": 0},
    )
    chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 7
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7


@pytest.mark.parametrize("adapter", ["openai", "anthropic"])
async def test_every_adapter(adapter: str, settings_factory: Any) -> None:
    """The same SDK calls on an OpenAI-compatible and an Anthropic model (real local servers)."""
    server_type = AnthropicServer if adapter == "anthropic" else ModelServer
    with server_type(Answer(tokens=("Bon", "jour"), finish_reason="length")) as srv:
        settings = settings_factory(models={"m": srv.model_config()})
        async with (
            Gateway(settings) as gw,
            openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client,
        ):
            messages: Any = [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "say hi"}]},
            ]
            whole = await client.chat.completions.create(model="m", messages=messages)
            assert whole.choices[0].message.content == "Bonjour"
            assert whole.choices[0].finish_reason == "length"
            stream = await client.chat.completions.create(
                model="m", messages=messages, stream=True, stream_options={"include_usage": True}
            )
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "Bonjour" and chunks[-1].usage is not None
            response = await client.responses.create(model="m", input="say hi")
            assert response.output_text == "Bonjour" and response.status == "incomplete"
