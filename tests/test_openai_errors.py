"""OpenAI-compatible routes: errors raise the ``openai`` SDK's typed exceptions; the sync
client works too; keep-alives never break the SDK's SSE decoder."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.model_server import FailMidStream, ModelServer
from tests.servers import Gateway

KEY = "tbk_openai_test_key_0123456789"


def _client(gw: Gateway, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as srv:
        yield srv


async def test_typed_exceptions(settings_factory: Any) -> None:
    settings = settings_factory(
        auth_disabled=False, api_keys=[KEY], rate_limit_generations="2/minute"
    )
    async with Gateway(settings) as gw, _client(gw) as client, _client(gw, "tbk_wrong") as bad:
        messages: Any = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.AuthenticationError) as auth:
            await bad.chat.completions.create(model="demo", messages=messages)
        assert auth.value.code == "invalid_api_key"
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nope", messages=messages)
        assert unknown.value.code == "unknown_model"
        with pytest.raises(openai.BadRequestError) as n:
            await client.chat.completions.create(model="demo", messages=messages, n=2)
        assert n.value.param == "n" and n.value.type == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as audio:
            await client.chat.completions.create(
                model="demo", messages=messages, audio={"voice": "alloy", "format": "wav"}
            )
        assert audio.value.param == "audio"
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve("resp_s_nothing_here")
        with pytest.raises(openai.UnprocessableEntityError) as too_many:
            await client.chat.completions.create(
                model="demo", messages=messages, max_tokens=10_000_000
            )
        assert too_many.value.code == "max_tokens_too_large"
        with pytest.raises(openai.BadRequestError) as bad_param:
            await client.responses.create(model="demo", input="x", temperature=7)
        assert bad_param.value.param == "temperature"
        for _ in range(2):
            await client.chat.completions.create(
                model="demo", messages=messages, max_tokens=1, extra_body={"rate": 0}
            )
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="demo", messages=messages)
        assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_other_key_headers(settings_factory: Any) -> None:
    settings = settings_factory(auth_disabled=False, api_keys=[KEY])
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        for header in ("api-key", "x-api-key"):
            ok = await http.post("/v1/chat/completions", json=body, headers={header: KEY})
            assert ok.status_code == 200, ok.text
        refused = await http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 401
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        login = await http.post("/v1/auth/login", json={"api_key": KEY})
        cookie = login.cookies["tb_console"]
        foreign = await http.post(
            "/v1/chat/completions",
            json=body,
            headers={"cookie": f"tb_console={cookie}", "origin": "http://elsewhere.example"},
        )
        assert foreign.status_code == 403
        assert foreign.json()["error"]["type"] == "permission_error"


async def test_conflict_on_unfinished_previous_response(gateway: Gateway) -> None:
    async with _client(gateway) as client:
        running = await client.responses.create(
            model="demo", input="slow", background=True, max_output_tokens=10_000,
            extra_body={"rate": 5},
        )  # fmt: skip
        with pytest.raises(openai.ConflictError):
            await client.responses.create(
                model="demo", input="next", previous_response_id=running.id
            )
        await client.responses.cancel(running.id)


async def test_provider_error(model_server: ModelServer, settings_factory: Any) -> None:
    model_server.reply = FailMidStream(tokens=("Hel", "lo"), message="the model crashed")
    settings = settings_factory(models={"local": model_server.model_config()})
    async with Gateway(settings) as gw, _client(gw) as client:
        messages: Any = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.InternalServerError) as whole:
            await client.chat.completions.create(model="local", messages=messages)
        assert "the model crashed" in whole.value.message
        stream = await client.chat.completions.create(model="local", messages=messages, stream=True)
        seen = []
        with pytest.raises(openai.APIError) as mid:
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content)
        assert "".join(s or "" for s in seen) == "Hello"
        assert "the model crashed" in mid.value.message


async def test_keepalives_do_not_break_the_sdk(settings_factory: Any) -> None:
    """The SDK hazard: a stream with pauses longer than the keep-alive interval."""
    settings = settings_factory(connection_heartbeat_s=0.05)
    async with Gateway(settings) as gw, _client(gw) as client:
        messages: Any = [{"role": "user", "content": "slowly"}]
        stream = await client.chat.completions.create(
            model="demo", messages=messages, max_tokens=4, stream=True, extra_body={"rate": 8}
        )
        chunks = [c async for c in stream]
        assert len("".join(c.choices[0].delta.content or "" for c in chunks).split()) == 4
        rstream = await client.responses.create(
            model="demo", input="slowly", max_output_tokens=4, stream=True,
            extra_body={"rate": 8},
        )  # fmt: skip
        events = [e async for e in rstream]
        assert events[-1].type == "response.incomplete"
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            raw_messages = [{"role": "user", "content": "slowly, raw"}]  # not a cache hit
            body = {"model": "demo", "messages": raw_messages, "max_tokens": 4, "rate": 8}
            raw = await http.post("/v1/chat/completions", json={**body, "stream": True})
        text = raw.text
        assert ": ping\n" in text and ": ping\n\n" not in text  # keep-alives were sent, lone
        for block in text.split("\n\n")[:-1]:
            lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
            assert any(ln.startswith("data: ") for ln in lines), block


def test_sync_client(gateway_in_thread: str) -> None:
    client = openai.OpenAI(base_url=gateway_in_thread + "/v1", api_key="x", max_retries=0)
    with client:
        completion = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "sync"}], max_tokens=3
        )
        assert len((completion.choices[0].message.content or "").split()) == 3
        stream = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "sync"}], max_tokens=3,
            stream=True, stream_options={"include_usage": True}, extra_body={"rate": 0},
        )  # fmt: skip
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        response = client.responses.create(model="demo", input="sync", max_output_tokens=3)
        assert len(response.output_text.split()) == 3


@pytest.fixture
def gateway_in_thread(settings_factory: Any) -> Iterator[str]:
    """A gateway on its own event loop in a thread, for the blocking sync client."""
    import threading

    ready: list[str] = []
    started = threading.Event()
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()

    async def main() -> None:
        async with Gateway(settings_factory()) as gw:
            ready.append(gw.url)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    assert started.wait(30)
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


async def test_interrupted_whole_answer_is_an_error(settings_factory: Any) -> None:
    """No worker runs the job and the connection idles out: a 503, never a partial answer."""
    settings = settings_factory(connection_idle_timeout_s=0.3)
    async with Gateway(settings, worker=False) as gw, _client(gw) as client:
        with pytest.raises(openai.InternalServerError) as interrupted:
            await client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "anyone?"}]
            )
        assert interrupted.value.status_code == 503
        assert interrupted.value.code == "answer_interrupted"
