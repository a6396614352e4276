"""Bad input to the HTTP API gets a 4xx ``{"error": {"code", "message"}}``, never a 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.servers import Gateway, RedisServer
from tests.sse_client import read_events
from tokenbridge.settings import Settings

MAX_BODY = 4 * 1024 * 1024
OK_PARAMS = {"max_tokens": 3, "rate": 0}


API_KEY = "tbk_" + secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
async def api(redis_server: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    """One gateway for the module: a rejected request changes nothing, so tests can share it."""
    settings = Settings(
        redis_url=redis_server.url,  # type: ignore[arg-type]
        key_prefix="t" + secrets.token_hex(4),
        consumer_heartbeat_s=0.5,
        consumer_block_ms=2000,
        api_keys=[API_KEY],  # type: ignore[list-item]
    )
    async with (
        Gateway(settings) as gw,
        httpx.AsyncClient(
            base_url=gw.url, timeout=30, headers={"authorization": f"Bearer {API_KEY}"}
        ) as client,
    ):
        yield client


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"].strip()


async def post(api: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await api.post("/v1/generations", json=body)


DEMO = {"model": "demo"}
HI = {"model": "demo", "prompt": "hi"}
INVALID = {  # each is rejected as 422 invalid_request by the body's schema
    "no-model": {"prompt": "hi"},
    "empty-model": {"model": "", "prompt": "hi"},
    "neither-prompt-nor-messages": DEMO,
    "both-prompt-and-messages": {**HI, "messages": [{"role": "user", "content": "hi"}]},
    "prompt-number": {**DEMO, "prompt": 5},
    "max-tokens-string": {**HI, "params": {"max_tokens": "5"}},
    "params-not-object": {**HI, "params": "fast"},
    "messages-str": {**DEMO, "messages": "hi"},
    "messages-empty": {**DEMO, "messages": []},
    "message-bad-role": {**DEMO, "messages": [{"role": "robot", "content": "hi"}]},
    "message-content-number": {**DEMO, "messages": [{"role": "user", "content": 7}]},
    "session-id-bad-char": {**HI, "session_id": "bad$id"},
    "session-id-65-chars": {**HI, "session_id": "s" * 65},
    "unknown-top-level-field": {**HI, "stream": True},
    "unknown-params-field": {**HI, "params": {"max_tokens": 3, "n": 2}},
    "body-is-list": [],
}


@pytest.mark.parametrize("body", list(INVALID.values()), ids=list(INVALID))
async def test_invalid_body_is_rejected(api: httpx.AsyncClient, body: Any) -> None:
    assert_error(await post(api, body), 422, "invalid_request")


async def test_unknown_model_and_max_tokens_over_limit(api: httpx.AsyncClient) -> None:
    assert_error(await post(api, {**HI, "model": "nope"}), 404, "unknown_model")
    too_many = {**HI, "params": {"max_tokens": 100_001}}
    assert_error(await post(api, too_many), 422, "max_tokens_too_large")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"model": "demo",', id="truncated"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"model": "\xff"}', id="not-utf8"),
        pytest.param(b"model=demo&prompt=hi", id="form"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
        pytest.param(b'{"model": "demo", "prompt": "\\ud800"}', id="lone-surrogate-prompt"),
        pytest.param(
            b'{"model": "demo", "messages": [{"role": "user", "content": "a\\udfff"}]}',
            id="lone-surrogate-message",
        ),
    ],
)
async def test_invalid_json(api: httpx.AsyncClient, raw: bytes) -> None:
    response = await api.post(
        "/v1/generations", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("raw", [b"null", b"42", b'"prompt"', b"true"])
async def test_json_not_an_object(api: httpx.AsyncClient, raw: bytes) -> None:
    response = await api.post(
        "/v1/generations", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "invalid_request")


async def test_body_over_4_mib_declared(api: httpx.AsyncClient) -> None:
    body = b'{"model": "demo", "prompt": "' + b"x" * MAX_BODY + b'"}'
    response = await api.post(
        "/v1/generations", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "request_too_large")


@pytest.mark.parametrize(
    ("path", "field", "limit"),
    [("/v1/generations", "prompt", MAX_BODY), ("/v1/admin/keys", "name", 64 * 1024)],
)
async def test_body_over_its_bound_sent_chunked(
    api: httpx.AsyncClient, path: str, field: str, limit: int
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no content-length: the stream is counted
        yield b'{"model": "demo", "' + field.encode() + b'": "'
        for _ in range(5):
            yield b"x" * (limit // 4)
        yield b'"}'

    response = await api.post(path, content=chunks())
    assert_error(response, 413, "request_too_large")


async def test_prompt_and_messages_over_limits(settings_factory: Any) -> None:
    settings = settings_factory(max_prompt_chars=10, max_messages=2)
    async with (
        Gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as api,
    ):
        ok = await post(api, {"model": "demo", "prompt": "x" * 10, "params": OK_PARAMS})
        assert ok.status_code == 202, ok.text
        too_long = await post(api, {"model": "demo", "prompt": "x" * 11})
        assert_error(too_long, 413, "prompt_too_large")
        messages = [{"role": "user", "content": "x" * 6}, {"role": "assistant", "content": "y" * 5}]
        assert_error(
            await post(api, {"model": "demo", "messages": messages}), 413, "prompt_too_large"
        )
        many = [{"role": "user", "content": "x"}] * 3
        assert_error(await post(api, {"model": "demo", "messages": many}), 413, "too_many_messages")


@pytest.mark.parametrize("session_id", ["bad$id", "s" * 65, "a%20b"])
async def test_invalid_session_id_in_events_path(api: httpx.AsyncClient, session_id: str) -> None:
    response = await api.get(f"/v1/sessions/{session_id}/events")
    assert_error(response, 400, "invalid_session_id")


BAD_EVENT_IDS = [
    "garbage",
    ":1-0",
    "ab:",
    "ab:1",
    "ab:1-",
    "ab:-1",
    "ab:x-1",
    "a b:1-0",
    "a" * 65 + ":1-0",
]


@pytest.mark.parametrize("value", BAD_EVENT_IDS)
async def test_malformed_last_event_id(api: httpx.AsyncClient, value: str) -> None:
    url = "/v1/sessions/s_ok/events"
    assert_error(await api.get(url, headers={"last-event-id": value}), 400, "invalid_last_event_id")
    response = await api.get(url, params={"last_event_id": value})
    assert_error(response, 400, "invalid_last_event_id")


async def start_and_read_epoch(http: httpx.AsyncClient) -> tuple[dict[str, Any], str]:
    """Start a demo generation; its session stream's epoch, from the first event's id."""
    started = await post(http, {"model": "demo", "prompt": "hi", "params": OK_PARAMS})
    assert started.status_code == 202, started.text
    async with (
        asyncio.timeout(10),
        contextlib.aclosing(read_events(http, started.json()["events_url"])) as events,
    ):
        first = await anext(events)
    assert first.id is not None
    return started.json(), first.id.split(":")[0]


@pytest.mark.parametrize(
    ("entry_id", "where"),
    [
        ("99999999999999999999-0", "header"),
        ("18446744073709551616-0", "header"),
        ("0-18446744073709551616", "header"),
        ("١٢-0", "query"),
    ],
)
async def test_last_event_id_redis_cannot_read(
    http: httpx.AsyncClient, entry_id: str, where: str
) -> None:
    """With the stream's real epoch such an id would reach XRANGE (which fails mid-stream)."""
    started, epoch = await start_and_read_epoch(http)
    url, value = started["events_url"], f"{epoch}:{entry_id}"
    if where == "header":
        response = await http.get(url, headers={"last-event-id": value})
    else:
        response = await http.get(url, params={"last_event_id": value})
    assert_error(response, 400, "invalid_last_event_id")


async def test_last_event_id_at_the_largest_stream_id(http: httpx.AsyncClient) -> None:
    started, epoch = await start_and_read_epoch(http)
    top = 2**64 - 1
    headers = {"last-event-id": f"{epoch}:{top}-{top}"}
    async with (
        asyncio.timeout(10),
        http.stream("GET", started["events_url"], headers=headers) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            assert_error(response, 400, "invalid_last_event_id")
            return
        # Nothing is after that id: the stream must stay open and carry the next generation.
        body = {"model": "demo", "prompt": "again", "session_id": started["session_id"]}
        again = await post(http, {**body, "params": OK_PARAMS})
        marker = f'"generation_id":"{again.json()["generation_id"]}"'
        async for line in response.aiter_lines():
            if line.startswith("data:") and marker in line:
                break


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/no/such/route", 404, "not_found"),
        ("GET", "/v1/sessions/s_ok/events/extra", 404, "not_found"),
        ("GET", "/v1/generations", 405, "method_not_allowed"),
        ("DELETE", "/v1/generations", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ],
)
async def test_unknown_route_and_wrong_method(
    api: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    assert_error(await api.request(method, path), status, code)


async def test_healthz(api: httpx.AsyncClient) -> None:
    response = await api.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_with_worker(api: httpx.AsyncClient) -> None:
    # The worker's heartbeat is a ZADD on a timer: there is no event to wait on, so poll the
    # endpoint itself, bounded (50 x 0.1 s); heartbeats come every 0.5 s in these settings.
    response = await api.get("/readyz")
    for _ in range(50):
        if response.status_code == 200:
            break
        await asyncio.sleep(0.1)
        response = await api.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and body["redis"] == "ok"
    assert body["workers"] >= 1


async def test_readyz_without_worker(settings_factory: Any) -> None:
    settings = settings_factory(key_prefix="t" + secrets.token_hex(4))
    async with (
        Gateway(settings, worker=False) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as api,
    ):
        assert_error(await api.get("/readyz"), 503, "no_worker")


async def test_models_lists_demo(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    [demo] = [model for model in body["data"] if model["id"] == "demo"]
    assert demo["object"] == "model" and demo["adapter"] == "demo"


async def test_index_html(api: httpx.AsyncClient) -> None:
    response = await api.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "tokenbridge" in response.text.lower()
