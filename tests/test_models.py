"""Model adapters: DemoModel without network, OpenAIChatModel against a real local server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from tests.model_server import Answer, FailMidStream, HttpError, ModelServer, Stall
from tokenbridge.exceptions import ProviderError, ProviderTimeout
from tokenbridge.model_config import ModelConfig
from tokenbridge.producer.models import (
    ChatModel,
    ChatRequest,
    Delta,
    DemoModel,
    Finish,
    GenerationParams,
    OpenAIChatModel,
    build_model,
)

KEY_ENV = "TB_TEST_MODEL_KEY"
SECRET = "sk-test-0123456789abcdef"

Collected = tuple[list[str], Finish | None]


def chat(content: str = "tell me about redis streams", **params: Any) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "user", "content": content}],
        params=GenerationParams(**params),
    )


async def collect(
    model: ChatModel, request: ChatRequest, into: list[str] | None = None
) -> Collected:
    """Every Delta text (also appended to ``into``, to inspect after an error) and the Finish."""
    texts = into if into is not None else []
    finish: Finish | None = None
    async with asyncio.timeout(10), aclosing(model.stream(request)) as items:
        async for item in items:
            assert finish is None, "nothing may follow the Finish"
            if isinstance(item, Delta):
                texts.append(item.text)
            else:
                finish = item
    return texts, finish


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer() as srv:
        yield srv


@pytest.fixture
async def openai_model() -> AsyncIterator[Callable[..., Awaitable[OpenAIChatModel]]]:
    """Build OpenAIChatModels that are all closed after the test."""
    made: list[OpenAIChatModel] = []

    async def make(config: ModelConfig, name: str = "gpt-test") -> OpenAIChatModel:
        model = OpenAIChatModel(name, config)
        made.append(model)
        return model

    yield make
    for model in made:
        await model.aclose()


# -- GenerationParams and build_model ------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": 0},
        {"temperature": 2.5},
        {"top_p": 1.5},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": ["x" * 65]},
        {"rate": -1},
        {"rate": 2_000_000},
        {"max_tokens": True},
        {"max_tokens": "10"},
        {"unknown": 1},
    ],
)
def test_params_reject_out_of_bounds(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerationParams.model_validate(params)


def test_params_accept_json_numbers() -> None:
    params = GenerationParams.model_validate({"temperature": 1, "rate": 0, "stop": ["\n"]})
    assert params.temperature == 1.0
    assert params.rate == 0


async def test_build_model_picks_the_adapter() -> None:
    demo = build_model("demo", ModelConfig(adapter="demo"))
    remote = build_model("gpt-x", ModelConfig(adapter="openai", base_url="http://127.0.0.1:9/v1"))
    try:
        assert isinstance(demo, DemoModel)
        assert demo.name == "demo"
        assert isinstance(remote, OpenAIChatModel)
        assert remote.upstream == "gpt-x"
    finally:
        await demo.aclose()
        await remote.aclose()


# -- DemoModel -----------------------------------------------------------------------------


async def test_demo_is_deterministic_and_exact() -> None:
    model = DemoModel()
    first, finish = await collect(model, chat(max_tokens=25, rate=0))
    again, _ = await collect(model, chat(max_tokens=25, rate=0))
    other, _ = await collect(model, chat("something else entirely", max_tokens=25, rate=0))
    seeded, _ = await collect(model, chat(max_tokens=25, rate=0, seed=7))

    assert first == again
    assert first != other
    assert first != seeded
    assert len(first) == 25
    assert not first[0].startswith(" ")
    assert all(text.startswith(" ") and len(text) > 1 for text in first[1:])
    assert finish == Finish(
        "length", usage={"prompt_tokens": 5, "completion_tokens": 25, "total_tokens": 30}
    )


async def test_demo_output_depends_only_on_the_request() -> None:
    """Pacing changes when tokens come, never which: a cut-and-resumed stream can be compared
    with an uncut one, whatever ``rate`` each ran at."""
    fast, _ = await collect(DemoModel(), chat(max_tokens=30, rate=0, seed=3))
    paced, _ = await collect(DemoModel(), chat(max_tokens=30, rate=3000, seed=3))
    longer, _ = await collect(DemoModel(), chat(max_tokens=60, rate=0, seed=3))
    assert fast == paced
    assert longer[:30] == fast


async def test_demo_default_length_finishes_with_stop() -> None:
    texts, finish = await collect(DemoModel(), chat(rate=0))
    assert len(texts) == 40
    assert finish is not None
    assert finish.reason == "stop"


async def test_demo_rate_zero_lets_other_tasks_run() -> None:
    """Unpaced, the stream still yields to the loop now and then (every ~256 tokens)."""
    seen_at: list[int] = []
    texts: list[str] = []

    async def observer() -> None:
        await asyncio.sleep(0)
        seen_at.append(len(texts))

    async with asyncio.TaskGroup() as group:
        group.create_task(observer())
        await collect(DemoModel(), chat(max_tokens=5000, rate=0), into=texts)

    assert len(texts) == 5000
    assert seen_at and seen_at[0] < 5000


async def test_demo_pacing_yields_over_time() -> None:
    loop = asyncio.get_running_loop()
    stamps: list[float] = []
    model = DemoModel()
    async with asyncio.timeout(10), aclosing(model.stream(chat(max_tokens=10, rate=200))) as it:
        async for item in it:
            stamps.append(loop.time())
            if isinstance(item, Finish):
                assert item.reason == "length"
    assert len(stamps) == 11
    assert stamps == sorted(stamps)


# -- OpenAIChatModel against ModelServer ---------------------------------------------------


async def test_openai_streams_tokens_then_usage(
    server: ModelServer, openai_model: Callable[..., Awaitable[OpenAIChatModel]]
) -> None:
    server.reply = Answer(tokens=("Hel", "lo", " there"), finish_reason="length")
    model = await openai_model(server.model_config())

    texts, finish = await collect(model, chat("hi you", max_tokens=3, temperature=0.5, seed=1))

    assert texts == ["Hel", "lo", " there"]
    assert finish == Finish(
        "length", usage={"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    )
    [body] = server.requests
    assert body["model"] == "test-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "hi you"}]
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (3, 0.5, 1)
    assert "top_p" not in body and "stop" not in body and "rate" not in body
    assert "authorization" not in server.headers[0]


async def test_openai_sends_the_key_and_reuses_the_model(
    server: ModelServer,
    openai_model: Callable[..., Awaitable[OpenAIChatModel]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    model = await openai_model(server.model_config(api_key_env=KEY_ENV))
    for _ in range(3):
        texts, finish = await collect(model, chat())
        assert "".join(texts) == "Hello, world!"
        assert finish is not None and finish.reason == "stop"
    assert len(server.requests) == 3
    assert all(h["authorization"] == f"Bearer {SECRET}" for h in server.headers)


async def test_openai_done_ends_the_stream(
    server: ModelServer, openai_model: Callable[..., Awaitable[OpenAIChatModel]]
) -> None:
    """After data: [DONE] the adapter stops reading, even if the body stays open."""
    server.reply = Answer(linger=True)
    model = await openai_model(server.model_config())
    texts, finish = await collect(model, chat())
    assert "".join(texts) == "Hello, world!"
    assert finish is not None


async def test_openai_stream_without_done_is_a_bad_response(
    server: ModelServer, openai_model: Callable[..., Awaitable[OpenAIChatModel]]
) -> None:
    server.reply = Answer(done=False)
    model = await openai_model(server.model_config())
    with pytest.raises(ProviderError) as info:
        await collect(model, chat())
    assert info.value.code == "provider_bad_response"


async def test_openai_error_mid_stream_after_tokens(
    server: ModelServer, openai_model: Callable[..., Awaitable[OpenAIChatModel]]
) -> None:
    server.reply = FailMidStream(tokens=("one", " two"), message="overloaded, try later")
    model = await openai_model(server.model_config())
    texts: list[str] = []
    with pytest.raises(ProviderError) as info:
        await collect(model, chat(), into=texts)
    assert texts == ["one", " two"]
    assert info.value.code == "provider_error"
    assert "overloaded, try later" in str(info.value)


async def test_openai_http_500(
    server: ModelServer, openai_model: Callable[..., Awaitable[OpenAIChatModel]]
) -> None:
    server.script(HttpError(500, "boom"))
    model = await openai_model(server.model_config())
    with pytest.raises(ProviderError) as info:
        await collect(model, chat())
    assert info.value.code == "provider_http_5xx"
    assert "500" in str(info.value) and "boom" in str(info.value)
    texts, _ = await collect(model, chat())  # the script is used up: a normal answer
    assert texts


async def test_openai_401_never_shows_the_key(
    server: ModelServer,
    openai_model: Callable[..., Awaitable[OpenAIChatModel]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.reply = HttpError(401, f"Incorrect API key provided: {SECRET}")
    model = await openai_model(server.model_config(api_key_env=KEY_ENV))
    with pytest.raises(ProviderError) as info:
        await collect(model, chat())
    assert info.value.code == "provider_unauthorized"
    assert "401" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(model)


@pytest.mark.parametrize("reply", [Stall(), Stall(tokens=("partial",))])
async def test_openai_stall_times_out(
    reply: Stall,
    server: ModelServer,
    openai_model: Callable[..., Awaitable[OpenAIChatModel]],
) -> None:
    server.reply = reply
    model = await openai_model(server.model_config(timeout_s=0.2))
    texts: list[str] = []
    with pytest.raises(ProviderTimeout) as info:
        await collect(model, chat(), into=texts)
    assert info.value.code == "provider_timeout"
    assert texts == list(reply.tokens)


async def test_openai_unreachable(openai_model: Callable[..., Awaitable[OpenAIChatModel]]) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ModelConfig(adapter="openai", base_url=f"http://127.0.0.1:{port}/v1")
    model = await openai_model(config)
    with pytest.raises(ProviderError) as info:
        await collect(model, chat())
    assert info.value.code == "provider_unreachable"


async def test_openai_closing_early_releases_the_call(
    server: ModelServer, openai_model: Callable[..., Awaitable[OpenAIChatModel]]
) -> None:
    server.reply = Answer(tokens=tuple(f" t{i}" for i in range(100)))
    model = await openai_model(server.model_config())
    async with asyncio.timeout(10), aclosing(model.stream(chat())) as items:
        first = await anext(items)
    assert first == Delta(" t0")
    texts, _ = await collect(model, chat())
    assert len(texts) == 100


async def test_model_server_answers_without_stream(server: ModelServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        resp = await client.post(
            "/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False},
        )
    assert resp.status_code == 200
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "Hello, world!"
    assert data["usage"]["completion_tokens"] == 4
