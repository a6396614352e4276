"""Providers handled like a good proxy: retries before the first token (Retry-After honoured),
no restart after it, fallbacks, client-facing errors without the provider's host; a real
gateway, a real Redis and real fake-provider servers (tests/model_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.model_server import Answer, FailMidStream, HttpError, ModelServer
from tests.servers import Gateway, free_port
from tests.sse_client import SSEEvent, read_events
from tests.test_cli import clean_env

FAST_RETRIES = {"provider_retry_base_s": 0.01, "provider_max_retries": 3}


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    with ModelServer() as srv:
        yield srv


async def run_generation(http: httpx.AsyncClient, model: str) -> list[SSEEvent]:
    response = await http.post("/v1/generations", json={"model": model, "prompt": "hi"})
    assert response.status_code == 202, response.text
    started = response.json()
    events: list[SSEEvent] = []
    stream = read_events(http, started["events_url"])
    async with asyncio.timeout(20), contextlib.aclosing(stream):
        async for ev in stream:
            events.append(ev)
            if ev.event in ("end", "error"):
                break
    return events


def metric(text: str, name: str, model: str) -> float:
    found = re.search(rf'^{name}_total\{{model="{model}"\}} (\S+)$', text, re.M)
    assert found, text
    return float(found.group(1))


async def test_429_with_retry_after_is_retried_and_counted(
    model_server: ModelServer, settings_factory: Any
) -> None:
    busy = HttpError(429, "slow down", headers=(("Retry-After", "1"),))
    model_server.script(busy, busy)
    settings = settings_factory(models={"gpt": model_server.model_config()}, **FAST_RETRIES)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        events = await run_generation(http, "gpt")
        assert [e.event for e in events] == ["start"] + ["token"] * 4 + ["end"]
        assert len(model_server.requests) == 3  # two 429s, then the answer
        scraped = (await http.get("/metrics")).text
    assert metric(scraped, "tokenbridge_provider_retries", "gpt") == 2


async def test_a_failure_after_3_tokens_is_an_error_event_without_retry(
    model_server: ModelServer, settings_factory: Any
) -> None:
    model_server.reply = FailMidStream(tokens=("a", "b", "c"), message="the model crashed")
    settings = settings_factory(models={"gpt": model_server.model_config()}, **FAST_RETRIES)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        events = await run_generation(http, "gpt")
        scraped = (await http.get("/metrics")).text
    assert [e.event for e in events] == ["start", "token", "token", "token", "error"]
    assert events[-1].data["code"] == "provider_error"
    assert "model 'gpt'" in events[-1].data["message"]
    assert len(model_server.requests) == 1  # no silent restart
    assert metric(scraped, "tokenbridge_provider_retries", "gpt") == 0


@pytest.mark.parametrize(
    "reply",
    [HttpError(503, "upstream at http://127.0.0.1:9/x is down"), HttpError(401, "bad key")],
    ids=["5xx-retried", "401-not-retried"],
)
async def test_errors_seen_by_clients_name_neither_host_nor_port(
    model_server: ModelServer, settings_factory: Any, reply: HttpError
) -> None:
    model_server.reply = reply
    settings = settings_factory(models={"gpt": model_server.model_config()}, **FAST_RETRIES)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        events = await run_generation(http, "gpt")
    error = events[-1]
    assert error.event == "error"
    text = str(error.data)
    assert "127.0.0.1" not in text and str(model_server.port) not in text
    assert "model 'gpt'" in text and "ProviderError" in text
    assert len(model_server.requests) == (4 if reply.status == 503 else 1)


async def test_unreachable_provider_is_retried_then_reported_without_its_address(
    settings_factory: Any,
) -> None:
    port = free_port()  # nothing listens there
    config = {"adapter": "openai", "model": "m", "base_url": f"http://127.0.0.1:{port}/v1"}
    settings = settings_factory(models={"gpt": config}, **FAST_RETRIES)
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        events = await run_generation(http, "gpt")
        scraped = (await http.get("/metrics")).text
    assert events[-1].data["code"] == "provider_unreachable"
    assert str(port) not in str(events[-1].data) and "127.0.0.1" not in str(events[-1].data)
    assert metric(scraped, "tokenbridge_provider_retries", "gpt") == 3


async def test_a_fallback_is_used_when_the_first_fails_before_its_first_token(
    settings_factory: Any,
) -> None:
    with ModelServer(HttpError(500, "down")) as first, ModelServer(Answer(("ok",))) as second:
        models = {
            "main": first.model_config(fallbacks=["backup"]),
            "backup": second.model_config(),
        }
        settings = settings_factory(models=models, **FAST_RETRIES)
        async with (
            Gateway(settings) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
        ):
            events = await run_generation(http, "main")
            scraped = (await http.get("/metrics")).text
        assert [e.event for e in events] == ["start", "token", "end"]
        assert events[1].data["text"] == "ok"
        assert len(first.requests) == 4 and len(second.requests) == 1  # 1 + 3 retries
    assert metric(scraped, "tokenbridge_provider_fallbacks", "main") == 1


async def _serve_then_generate(args: list[str], env: dict[str, str], model: str) -> str:
    """``tokenbridge serve ARGS`` as a process; one generation of ``model``; its stderr."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenbridge", "serve", "--port", str(port), "--ephemeral", *args],
        env=clean_env(TOKENBRIDGE_AUTH_DISABLED="true", **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(30):
            while b"tokenbridge serving" not in (line := await asyncio.to_thread(
                process.stdout.readline)):  # fmt: skip
                assert line, "serve exited before serving"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            events = await run_generation(http, model)
        assert [e.event for e in events] == ["start"] + ["token"] * 4 + ["end"], events
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 20)
        stderr = (await asyncio.to_thread(process.stderr.read)).decode()
        process.stdout.close()
        process.stderr.close()
    return stderr


async def test_serve_model_flag_runs_a_generation(model_server: ModelServer) -> None:
    spec = f"fake=openai:{model_server.model}@{model_server.base_url}"
    await _serve_then_generate(["--model", spec], {}, "fake")
    assert model_server.requests[0]["model"] == model_server.model


async def test_serve_config_file_runs_a_generation_and_warns_of_an_unset_key(
    model_server: ModelServer, tmp_path: Path
) -> None:
    config = tmp_path / "tokenbridge.toml"
    config.write_text(
        "shutdown_drain_s = 2\n"
        "[models.fake]\n"
        'adapter = "openai"\n'
        f'model = "{model_server.model}"\n'
        f'base_url = "{model_server.base_url}"\n'
        'api_key_env = "TB_TEST_KEY_NOT_SET"\n'
    )
    stderr = await _serve_then_generate(["--config", str(config)], {}, "fake")
    warnings = [line for line in stderr.splitlines() if "TB_TEST_KEY_NOT_SET" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], stderr


async def test_a_retry_after_beyond_the_cap_ends_the_retries(
    model_server: ModelServer, settings_factory: Any
) -> None:
    model_server.reply = HttpError(429, "quota", headers=(("Retry-After", "120"),))
    settings = settings_factory(
        models={"gpt": model_server.model_config()}, provider_retry_max_wait_s=5, **FAST_RETRIES
    )
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        events = await run_generation(http, "gpt")
    assert events[-1].event == "error"
    assert events[-1].data["code"] == "provider_rate_limited"
    assert len(model_server.requests) == 1  # waiting 120 s would hold the generation hostage
