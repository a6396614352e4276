"""Rate limits against a real Redis: 429 before any model call, across processes, exact
token charges under redelivery."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import BOTH
from tests.servers import Gateway, GatewayProcess
from tokenbridge.exceptions import ConfigurationError, LimitExceeded
from tokenbridge.gateway.admission import Admission
from tokenbridge.processors.rate_limit import (
    Rate,
    RateLimiter,
    RateLimitProcessor,
    batch_tokens,
    parse_rate,
)
from tokenbridge.producer.jobs import GenerationJob, Message
from tokenbridge.runtime import Runtime
from tokenbridge.settings import Settings, load_settings
from tokenbridge.store.scripts import RateLimitCheck
from tokenbridge.wire.events import Event
from tokenbridge.wire.pipeline import PipelineBatch

KEY_A = "tbk_alpha_0123456789abcdef"
KEY_B = "tbk_bravo_0123456789abcdef"


def batch(generation_id: str, seqs: range, model: str = "demo") -> PipelineBatch:
    """A pipeline batch of token events, as the producer flushes them."""
    events = tuple(Event("token", generation_id, seq, text="x") for seq in seqs)
    return PipelineBatch("s_budget", generation_id, model, events)


def body(model: str = "demo") -> dict[str, Any]:
    return {"model": model, "prompt": "hi", "params": {"max_tokens": 1, "rate": 0}}


async def post(http: httpx.AsyncClient, key: str, model: str = "demo") -> httpx.Response:
    return await http.post(
        "/v1/generations", json=body(model), headers={"authorization": f"Bearer {key}"}
    )


@contextlib.asynccontextmanager
async def limiter_for(settings: Settings) -> AsyncIterator[RateLimiter]:
    async with Runtime(settings, worker=False, processors=False) as runtime:
        yield runtime.rate_limiter


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10/minute", Rate(10, 60, "10/minute")),
        ("1/second", Rate(1, 1, "1/second")),
        ("100/30s", Rate(100, 30, "100/30s")),
        ("5/2h", Rate(5, 7200, "5/2h")),
        ("7/day", Rate(7, 86_400, "7/day")),
    ],
)
def test_parse_rate(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["0/minute", "10/fortnight", "10 per minute", "-1/s", "10/"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


async def test_no_limit_unless_configured(settings: Settings) -> None:
    async with Runtime(settings, worker=False, processors=False) as runtime:
        assert Admission.from_settings(runtime.redis, runtime.keys, settings).checks == []
        assert not runtime.rate_limiter.enabled


async def test_key_over_its_generation_limit_gets_429(settings_factory: Any) -> None:
    settings = settings_factory(
        auth_disabled=False, api_keys=[KEY_A, KEY_B], rate_limit_generations="2/minute"
    )
    async with Gateway(settings, worker=False) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        assert [(await post(http, KEY_A)).status_code for _ in range(2)] == [202, 202]
        refused = await post(http, KEY_A)
        # Another key has a budget of its own.
        assert (await post(http, KEY_B)).status_code == 202
        jobs = await gw.runtime.redis.xlen(gw.runtime.keys.jobs)
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert error["code"] == "generation_rate_exceeded"
    assert "2 generations per minute" in error["message"]
    assert "TOKENBRIDGE_RATE_LIMIT_GENERATIONS=2/minute" in error["message"]
    assert jobs == 3  # the refused request queued nothing: no model call can follow


async def test_limit_is_per_model(settings_factory: Any) -> None:
    models = {"demo": {"adapter": "demo"}, "other": {"adapter": "demo"}}
    settings = settings_factory(
        auth_disabled=False, api_keys=[KEY_A], rate_limit_generations="1/minute", models=models
    )
    async with Gateway(settings, worker=False) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        assert (await post(http, KEY_A, "demo")).status_code == 202
        assert (await post(http, KEY_A, "other")).status_code == 202
        assert (await post(http, KEY_A, "demo")).status_code == 429


async def test_model_limit_refusal_gives_back_the_key_scope(settings_factory: Any) -> None:
    """A request refused by the model's limit does not use up the key's own budget."""
    settings = settings_factory(
        rate_limit_generations="2/minute", rate_limit_model_generations="1/minute"
    )
    async with limiter_for(settings) as limiter:
        await limiter.admit("key:a", "demo")
        with pytest.raises(LimitExceeded) as info:
            await limiter.admit("key:b", "demo")
        assert info.value.code == "model_generation_rate_exceeded"
        assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 60
        # key:b's refused attempt was refunded: both of its 2 are still free.
        key_scope = limiter.scope_key(limiter.scopes[0], "key:b", "demo")
        both = [RateLimitCheck("gen", 2, 60, cost=2)]
        assert await limiter.scripts.rate_limit("admit", key_scope, both) == (0, 0.0)


@BOTH
async def test_limit_holds_across_two_gateway_processes(settings: Settings) -> None:
    env = {
        "TOKENBRIDGE_REDIS_URL": settings.redis_url_value() or "",
        "TOKENBRIDGE_KEY_PREFIX": settings.key_prefix,
        "TOKENBRIDGE_API_KEYS": KEY_A,
        "TOKENBRIDGE_AUTH_DISABLED": "false",
        "TOKENBRIDGE_RATE_LIMIT_GENERATIONS": "3/minute",
    }
    gateways = [
        GatewayProcess(env, args=["serve", "--no-worker", "--log-level", "warning"])
        for _ in range(2)
    ]
    for gw in gateways:
        gw.args += ["--port", str(gw.port)]
        gw.start()
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(gw.wait_ready() for gw in gateways))
            async with (
                httpx.AsyncClient(base_url=gateways[0].url) as first,
                httpx.AsyncClient(base_url=gateways[1].url) as second,
            ):
                statuses = [
                    (await post(first, KEY_A)).status_code,
                    (await post(second, KEY_A)).status_code,
                    (await post(first, KEY_A)).status_code,
                ]
                refused = [await post(second, KEY_A), await post(first, KEY_A)]
    finally:
        for gw in gateways:
            gw.stop()
    assert statuses == [202, 202, 202]
    assert [r.status_code for r in refused] == [429, 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert {r.json()["error"]["code"] for r in refused} == {"generation_rate_exceeded"}


def test_batch_tokens_counts_tokens_and_usage_beyond_them() -> None:
    tokens = [Event("token", "g_1", i, text="x") for i in (1, 2, 3)]
    assert batch_tokens(tokens) == 3
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    end = Event("end", "g_1", 6, reason="stop", tokens=4, usage=usage)
    assert batch_tokens([end]) == 10 + 1  # the prompt, and one token the events did not carry
    assert batch_tokens([Event("end", "g_1", 6, reason="stop", tokens=4)]) == 0


@BOTH
async def test_token_budget_charged_once_per_entry(settings_factory: Any) -> None:
    """RateLimitProcessor charges each pipeline batch once, even when it is delivered twice
    (or replayed from the dead letters under a new entry id); an overdrawn budget refuses the
    next generation with the token limit's code."""
    settings = settings_factory(rate_limit_tokens_per_minute=10)
    async with limiter_for(settings) as limiter:
        job = GenerationJob(
            generation_id="g_budget",
            session_id="s_budget",
            model="demo",
            messages=[Message(role="user", content="hi")],
            identity="key:a",
        )
        await limiter.track(job)
        processor = RateLimitProcessor(limiter)
        six = batch("g_budget", range(1, 7))
        await processor.process(six, "1-0")
        await processor.process(six, "1-0")  # redelivered
        await processor.process(six, "9-0")  # replayed from the dead letters
        await limiter.admit("key:a", "demo")  # 6 of 10 used: still admitted
        await processor.process(batch("g_budget", range(7, 11)), "2-0")
        assert processor.charged == 10
        with pytest.raises(LimitExceeded) as info:
            await limiter.admit("key:a", "demo")
        assert info.value.code == "token_rate_exceeded"
        assert "10 tokens per minute" in str(info.value)
        await limiter.admit("key:b", "demo")  # another key's budget is untouched


async def test_untracked_generation_is_not_charged(settings_factory: Any) -> None:
    """A generation the worker did not note (a cached replay) costs no tokens."""
    settings = settings_factory(rate_limit_tokens_per_minute=1)
    async with limiter_for(settings) as limiter:
        processor = RateLimitProcessor(limiter)
        await processor.process(batch("g_cached", range(1, 50)), "1-0")
        assert processor.charged == 0
        await limiter.admit("anonymous:", "demo")


def test_token_budget_without_the_pipeline_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="TOKENBRIDGE_PIPELINE_ENABLED"):
        load_settings(rate_limit_tokens_per_minute=100, pipeline_enabled=False)
    with pytest.raises(ConfigurationError, match="rate_limit processor"):
        load_settings(rate_limit_model_tokens_per_minute=100, processors="analytics,cache")


async def test_token_budget_charged_from_pipeline_counts(settings_factory: Any) -> None:
    """End to end: a generation's tokens (5 token events and 1 prompt token, from the pipeline
    entries the producer wrote) use up a budget of 6, so the key's next request gets 429."""
    settings = settings_factory(
        auth_disabled=False, api_keys=[KEY_A, KEY_B], rate_limit_tokens_per_minute=6
    )
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        processor = next(p for p in gw.runtime.processor.processors if p.name == "rate_limit")
        charged = asyncio.Event()
        process = processor.process

        async def process_and_tell(batch: PipelineBatch, entry_id: str) -> None:
            await process(batch, entry_id)
            if processor.charged >= 6:  # batches may be processed in any order
                charged.set()

        processor.process = process_and_tell
        body = {"model": "demo", "prompt": "hi", "params": {"max_tokens": 5, "rate": 0}}
        headers = {"authorization": f"Bearer {KEY_A}"}
        started = await http.post("/v1/generations", json=body, headers=headers)
        assert started.status_code == 202, started.text
        async with asyncio.timeout(10):
            await charged.wait()
        assert processor.charged == 6
        refused = await http.post("/v1/generations", json=body, headers=headers)
        other = await post(http, KEY_B)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "token_rate_exceeded"
    assert "6 tokens per minute" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 202
