"""Closed by default: API keys, session-scoped subscribe tokens, cookie login, Redis auth."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect

from tests.conftest import BOTH
from tests.servers import Gateway, RedisServer, free_port
from tests.sse_client import read_events
from tokenbridge.exceptions import RedisUnavailable
from tokenbridge.runtime import Runtime

KEY = "tbk_" + secrets.token_urlsafe(24)
SECRET = secrets.token_urlsafe(32)
OLD_SECRET = secrets.token_urlsafe(32)


@pytest.fixture
async def secured(settings_factory: Any) -> AsyncIterator[Gateway]:
    settings = settings_factory(
        auth_disabled=False,
        api_keys=[KEY],
        auth_secret=SECRET,
        auth_previous_secrets=[OLD_SECRET],
    )
    async with Gateway(settings) as gw:
        yield gw


def bearer(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def start(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    payload = {"model": "demo", "prompt": "hi", "params": {"max_tokens": 3, "rate": 0}, **body}
    response = await http.post("/v1/generations", json=payload, headers=bearer())
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def token(sub: str, secret: str = SECRET, ttl_s: int = 60, scope: str = "subscribe") -> str:
    now = int(time.time())
    return jwt.encode({"scope": scope, "sub": sub, "iat": now, "exp": now + ttl_s}, secret)


async def test_every_protected_endpoint_wants_credentials(secured: Gateway) -> None:
    async with httpx.AsyncClient(base_url=secured.url) as http:
        for method, path in [
            ("POST", "/v1/generations"),
            ("DELETE", "/v1/generations/g_1"),
            ("GET", "/v1/models"),
            ("GET", "/v1/status"),
            ("GET", "/v1/sessions/s_1/events"),
        ]:
            response = await http.request(method, path, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "missing_credentials"
            assert response.headers["www-authenticate"].startswith("Bearer")
            wrong = await http.request(method, path, json={}, headers=bearer("tbk_wrong"))
            assert wrong.status_code == 401
            assert wrong.json()["error"]["code"] == "invalid_api_key"
        for path in ("/healthz", "/"):
            assert (await http.get(path)).status_code == 200  # public


async def test_subscribe_token_is_scoped_to_its_session(secured: Gateway) -> None:
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as http:
        started = await start(http)
        sid = started["session_id"]
        async with asyncio.timeout(20):
            events = [e async for e in _until_end(http, started["events_url"])]
        assert events[-1].event == "end"
        other = await http.get(f"/v1/sessions/s_other/events?token={started['token']}")
        assert other.status_code == 403
        assert other.json()["error"]["code"] == "forbidden_session"
        expired = await http.get(f"/v1/sessions/{sid}/events?token={token(sid, ttl_s=-10)}")
        assert expired.status_code == 401
        assert expired.json()["error"]["code"] == "token_expired"
        tampered = started["token"][:-3] + (
            "AAA" if not started["token"].endswith("AAA") else "BBB"
        )
        bad = await http.get(f"/v1/sessions/{sid}/events?token={tampered}")
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_token"
        forged = await http.get(f"/v1/sessions/{sid}/events?token={token(sid, secret='x' * 40)}")
        assert forged.status_code == 401
        wrong_scope = await http.get(
            f"/v1/sessions/{sid}/events?token={token(sid, scope='console')}"
        )
        assert wrong_scope.status_code == 401


async def test_rotation_window_accepts_the_previous_secret(secured: Gateway) -> None:
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as http:
        started = await start(http)
        sid = started["session_id"]
        old = token(sid, secret=OLD_SECRET)
        async with asyncio.timeout(20):
            events = [e async for e in _until_end(http, f"/v1/sessions/{sid}/events?token={old}")]
    assert events[-1].event == "end"


async def test_websocket_with_a_bad_token_closes_before_any_event(secured: Gateway) -> None:
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as http:
        started = await start(http)
    ws_base = secured.url.replace("http://", "ws://")
    for query in ("", f"?token={token('s_other')}", "?token=garbage"):
        async with connect(f"{ws_base}/v1/sessions/{started['session_id']}/ws{query}") as ws:
            with pytest.raises(Exception, match="1008"):
                await ws.recv()  # the close frame, not an event
        assert ws.close_code == 1008
    async with connect(ws_base + started["ws_url"]) as ws:
        assert '"event":"start"' in str(await ws.recv())


@BOTH
async def test_stored_keys_work_everywhere_and_revoke_at_once(secured: Gateway) -> None:
    auth = secured.state.auth
    key_id, key = await auth.create_key("test")
    async with httpx.AsyncClient(base_url=secured.url) as http:
        assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200
        assert key_id in {row["id"] for row in await auth.list_keys()}
        assert await auth.revoke_key(key_id)
        assert (await http.get("/v1/models", headers=bearer(key))).status_code == 401


@BOTH
async def test_tokens_and_keys_work_on_every_gateway_sharing_redis(settings_factory: Any) -> None:
    """No secret configured: it is made once and shared through Redis."""
    settings = settings_factory(auth_disabled=False, api_keys=[KEY])
    async with (
        Gateway(settings) as first,
        Gateway(settings, worker=False) as second,
        httpx.AsyncClient(timeout=30) as http,
    ):
        response = await http.post(
            f"{first.url}/v1/generations",
            json={"model": "demo", "prompt": "x", "params": {"max_tokens": 2, "rate": 0}},
            headers=bearer(),
        )
        started = response.json()
        async with asyncio.timeout(20):
            events = [e async for e in _until_end(http, second.url + started["events_url"])]
    assert events[-1].event == "end"


async def test_one_time_login_link_sets_a_console_cookie(secured: Gateway) -> None:
    code = await secured.state.auth.login_code()
    async with httpx.AsyncClient(base_url=secured.url) as http:
        first = await http.get(f"/?login={code}")
        assert first.status_code == 303 and "tb_console" in first.cookies
        assert "httponly" in first.headers["set-cookie"].lower()
        assert (await http.get("/v1/models")).status_code == 200  # the cookie is enough
        cross = await http.post(
            "/v1/generations",
            json={"model": "demo", "prompt": "x"},
            headers={"origin": "https://evil.example"},
        )
        assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_origin"
    async with httpx.AsyncClient(base_url=secured.url) as fresh:
        again = await fresh.get(f"/?login={code}")
        assert again.status_code == 401  # single use
        login = await fresh.post("/v1/auth/login", json={"api_key": KEY})
        assert login.status_code == 200 and (await fresh.get("/v1/models")).status_code == 200


async def test_no_key_or_token_in_the_logs(
    secured: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as http:
        started = await start(http)
        async with asyncio.timeout(20):
            events = [e async for e in _until_end(http, started["events_url"])]
        await http.get("/v1/models", headers=bearer("tbk_wrong_key_value"))
    assert events[-1].event == "end"
    # The service's own records (the test's httpx client logs its URLs: not the service).
    ours = [r for r in caplog.records if r.name.startswith(("tokenbridge", "uvicorn"))]
    text = "\n".join(r.getMessage() for r in ours)
    assert any("generation finished" in r.getMessage() for r in ours)
    for secret in (KEY, started["token"], SECRET, "tbk_wrong_key_value"):
        assert secret not in text


def test_redacting_filter_masks_credentials() -> None:
    from tokenbridge.logs import redact

    line = f"GET /v1/sessions/s/events?token={token('s')}&x=1 Authorization: Bearer {KEY} {KEY}"
    masked = redact(line)
    assert KEY not in masked and token("s") not in masked and "x=1" in masked


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    args = ["--requirepass", "rootpw", "--user", "alice", "on", ">alicepw", "~*", "&*", "+@all"]
    with RedisServer(extra_args=args) as server:
        yield server


async def test_redis_url_credentials_and_a_clear_error_when_wrong(
    acl_redis: RedisServer, settings_factory: Any
) -> None:
    good = f"redis://alice:alicepw@127.0.0.1:{acl_redis.port}/0"
    async with (
        Gateway(settings_factory(redis_url=good)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        started = await start(http)  # the whole token path runs as alice
        async with asyncio.timeout(20):
            events = [e async for e in _until_end(http, started["events_url"])]
        assert events[-1].event == "end"
    bad = f"redis://alice:nope@127.0.0.1:{acl_redis.port}/0"
    with pytest.raises(RedisUnavailable) as caught:
        async with Runtime(settings_factory(redis_url=bad)):
            pass
    assert "nope" not in str(caught.value) and "cannot reach Redis" in str(caught.value)
    env = {**os.environ, "TOKENBRIDGE_REDIS_URL": bad}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tokenbridge", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "nope" not in done.stderr


async def _until_end(http: httpx.AsyncClient, url: str) -> AsyncIterator[Any]:
    async for event in read_events(http, url):
        yield event
        if event.event in ("end", "error"):
            return


@pytest.fixture
def tls_redis(tmp_path: Any) -> Iterator[tuple[RedisServer, int, str]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    tls_port = free_port()
    args = ["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]  # fmt: skip
    try:
        server = RedisServer(extra_args=args)
        server.start()
    except RedisUnavailable as exc:
        pytest.skip(f"this redis-server has no TLS: {exc}")
    try:
        yield server, tls_port, str(cert)
    finally:
        server.stop()


async def test_redis_over_tls(
    tls_redis: tuple[RedisServer, int, str], settings_factory: Any
) -> None:
    _, tls_port, cert = tls_redis
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
    async with (
        Gateway(settings_factory(redis_url=url)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as http,
    ):
        started = await start(http)
        async with asyncio.timeout(20):
            events = [e async for e in _until_end(http, started["events_url"])]
    assert events[-1].event == "end"


async def test_cors_is_off_by_default_and_allows_listed_origins(
    secured: Gateway, settings_factory: Any
) -> None:
    preflight = {
        "origin": "https://app.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    async with httpx.AsyncClient(base_url=secured.url) as http:
        response = await http.options("/v1/generations", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    settings = settings_factory(cors_origins=["https://app.example"])
    async with Gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        response = await http.options("/v1/generations", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.options(
            "/v1/generations", headers={**preflight, "origin": "https://evil.example"}
        )
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
